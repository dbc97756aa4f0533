#!/usr/bin/env python3
"""Medians per (mode, impl) over the rounds of one or more run.sh outputs: summarize.py results/*.txt"""
import statistics, sys
from collections import defaultdict
rows = defaultdict(list)
for path in sys.argv[1:]:
    for line in open(path):
        kv = dict(f.split("=", 1) for f in line.split() if "=" in f)
        if "mode" in kv:
            rows[(kv["mode"], kv["impl"])].append(kv)
keys = {"idle": ["rss_per_conn", "heap_per_conn"], "warm": ["rss_per_conn", "heap_per_conn"],
        "bcast": ["msgs_per_s", "server_ns_per_msg", "server_cpu_s", "client_cpu_s", "server_sys_share"]}
for (mode, impl), runs in sorted(rows.items()):
    cells = []
    for k in keys[mode]:
        vals = [float(r[k]) for r in runs if k in r]
        cells.append(f"{k}={statistics.median(vals):.6g} [{' '.join(f'{v:.6g}' for v in vals)}]")
    print(f"{mode:5} {impl:10} n={len(runs)} " + "  ".join(cells))
