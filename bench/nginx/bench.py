#!/usr/bin/env python3
"""nginx proxy overhead: cozy direct vs the rendered nginx vs a hand-written config (issue 10).

Not a test: a measurement run on demand through `bench/nginx/run`, which makes sure of wrk, nginx,
MariaDB and Redis and of the release binary, then calls this script. Everything of one run lands in
`bench/nginx/results/<UTC time>/` (the exact nginx trees measured, raw wrk output, per-run CPU counts,
summary.json, summary.txt); the table is printed at the end. See docs/benchmarks.md.

Three ways to reach one `cozy serve` (MySQL database of its own, Redis sessions):
  A  direct: wrk → cozy on 127.0.0.1:PORT;
  B  rendered: wrk → nginx running the tree `cozy nginx render --check --out` wrote for an inventory
     with one app host (127.0.0.1:PORT) → cozy. Upstream keep-alive, JSON access log, request ids,
     security headers, limit_req (with limits far above what wrk sends: a benchmark must not be
     throttled);
  C  hand-written: wrk → nginx with the config people usually write (`proxy_pass http://127.0.0.1:PORT`
     in `location /`, a few proxy_set_header, the main config's combined access log): HTTP/1.0 to the
     upstream and a new connection per request, since nginx keeps none by default.
B and C get the same main nginx.conf (Debian's shape, as `cozy nginx render --check` uses, with
`worker_processes` from --nginx-workers, 1 by default) and run side by side for the whole run; only wrk's
target changes. cozy is one `cozy serve` process by default (its tokio runtime runs a thread per core).

Two workloads: `get` (GET /v1/resources/{id} with a bearer token) and `flow` (POST /v1/reservations then
POST /v1/reservations/{id}/pay, chained in wrk.lua). Every measured run is one wrk invocation; the variants
are interleaved (the order rotates each round: ABC, BCA, CAB) so that the drift of a shared 2-core machine
hits all three alike; medians over the rounds are reported, with the per-round ratios.

Around every run the CPU time of each party is read from /proc (wrk, cozy, the nginx under test,
mariadbd, redis-server; `foreign`: every other user process; `unattributed`: the rest of the machine's
busy time from /proc/stat; `steal`: the hypervisor's), to say where the 2 cores went. The machine is
usually shared: a run in which foreign + unattributed + steal exceed --disturbed-cores is flagged "disturbed", and --retry-disturbed measures such a
round again; --wait-quiet first waits for a quiet machine.
"""

import argparse
import hashlib
import json
import os
import platform
import re
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path
import http.client

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
VARIANTS = ("A", "B", "C")
LABELS = {"A": "direct", "B": "rendered nginx", "C": "hand-written nginx"}
SERVER_NAME = "bench.test"
TICK = os.sysconf("SC_CLK_TCK")


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, proc, what, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode} before listening on {port}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"{what} does not listen on {port} after {timeout} s")


# ---------------------------------------------------------------------------------------------------
# CPU accounting


def proc_stat(pid):
    """(ppid, CPU ticks, comm) of a process, or None if it is gone. The ticks are utime + stime plus
    cutime + cstime, the time of its children that have ended and been waited for: a test harness that
    runs many short processes is charged with them once they end, where a snapshot would miss them."""
    try:
        raw = open(f"/proc/{pid}/stat").read()
    except OSError:
        return None
    comm = raw[raw.index("(") + 1:raw.rindex(")")]
    fields = raw.rsplit(")", 1)[1].split()
    return int(fields[1]), sum(int(x) for x in fields[11:15]), comm


def all_procs():
    out = {}
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            st = proc_stat(pid)
            if st:
                out[int(pid)] = st
    return out


def tree(procs, root):
    """root and all its descendants."""
    pids, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, _, _) in procs.items():
            if ppid == parent and pid not in pids:
                pids.add(pid)
                frontier.append(pid)
    return pids


def machine_busy():
    """(busy ticks, steal ticks) of the whole machine since boot. Busy leaves out idle, iowait and steal
    (time the hypervisor gave to other guests: capacity this VM wanted and did not get)."""
    f = [int(x) for x in open("/proc/stat").readline().split()[1:9]]
    return sum(f) - f[3] - f[4] - f[7], f[7]


def has_environment(pid):
    """Kernel threads have none; every user process has one."""
    try:
        return bool(open(f"/proc/{pid}/environ", "rb").read(1))
    except OSError:
        return False


class CpuSnapshot:
    """CPU ticks of every process at one moment, and of the whole machine.

    since() splits the machine's busy time between the parties of the measurement (named process trees:
    cozy, the nginx under test; named processes: mariadbd, redis-server; wrk is counted by the caller),
    `foreign` (every other user process: another engineer's build or test suite; a process that started
    during the run counts whole) and `unattributed` (the rest: kernel threads, and foreign processes that
    both started and ended during the run and whose parent is not one we see; on a quiet machine it stays
    under 0.05 cores, the loopback traffic's softirq work being charged to the processes). `steal` is
    apart: time the hypervisor gave to other guests."""

    def __init__(self, roots, names):
        self.roots, self.names = roots, names
        self.procs = all_procs()
        self.t = time.monotonic()
        self.busy, self.steal = machine_busy()

    def since(self, before):
        wall = self.t - before.t
        busy = (self.busy - before.busy) / TICK
        used, seen = {}, {os.getpid()}

        def delta(pid):
            return self.procs[pid][1] - (before.procs[pid][1] if pid in before.procs else 0)

        for label, root in self.roots.items():
            pids = tree(self.procs, root) if root in self.procs else set()
            used[label] = sum(delta(p) for p in pids) / TICK
            seen |= pids
        for label, comms in self.names.items():
            pids = {p for p, (_, _, c) in self.procs.items() if c in comms}
            used[label] = sum(delta(p) for p in pids) / TICK
            seen |= pids
        used["foreign"] = sum(delta(p) for p in self.procs if p not in seen and has_environment(p)) / TICK
        used["unattributed"] = max(0.0, busy - sum(used.values()))
        used["steal"] = (self.steal - before.steal) / TICK
        return wall, busy, used


def wait_quiet(minutes, threshold_cores):
    """Waits (at most `minutes`) for 10 s in which the whole machine is busy less than threshold_cores
    (nothing of ours is loaded while waiting)."""
    deadline = time.monotonic() + minutes * 60
    while True:
        a = CpuSnapshot({}, {})
        time.sleep(10)
        wall, busy, used = CpuSnapshot({}, {}).since(a)
        busy += used["steal"]
        if busy / wall < threshold_cores:
            log(f"machine quiet ({busy / wall:.2f} cores busy over 10 s)")
            return True
        top = busiest_foreign(a)
        if time.monotonic() > deadline:
            log(f"machine still busy after {minutes} min ({busy / wall:.2f} cores: {top}); measuring anyway")
            return False
        log(f"waiting for a quiet machine: {busy / wall:.2f} cores busy over 10 s ({top})")


def busiest_foreign(before):
    now = all_procs()
    use = {}
    for pid, (_, ticks, comm) in now.items():
        d = ticks - (before.procs[pid][1] if pid in before.procs else 0)
        if d > 0:
            use[comm] = use.get(comm, 0) + d / TICK
    return ", ".join(f"{c} {v:.1f} s" for v, c in sorted(((v, c) for c, v in use.items()), reverse=True)[:4])


# ---------------------------------------------------------------------------------------------------
# The database, cozy, and the data the load needs


def mysql_cli(url, sql):
    u = urllib.parse.urlparse(url)
    cmd = ["mysql", "--protocol=TCP", "-h", u.hostname or "127.0.0.1", "-P", str(u.port or 3306),
           "-u", urllib.parse.unquote(u.username or "root")]
    env = dict(os.environ)
    if u.password:
        env["MYSQL_PWD"] = urllib.parse.unquote(u.password)
    subprocess.run(cmd + ["-e", sql], check=True, env=env)


class Cozy:
    def __init__(self, exe, work, port, db_url, redis_url, workers):
        self.exe = str(exe)
        self.port = port
        self.work = work
        self.workers = workers
        env = {k: v for k, v in os.environ.items() if not k.startswith("COZY_")}
        env.update({
            "COZY_DATABASE_URL": db_url,
            "COZY_REDIS_URL": redis_url,
            "COZY_RUN_DIR": str(work / "run"),
            "COZY_DATA_DIR": str(work / "data"),
            "COZY_LOG_FORMAT": "json",
            # cozy's own login limit must not bite when the setup logs in 32 users from one address.
            "COZY_AUTH_RATE_PER_MINUTE": "600000",
            "COZY_AUTH_BURST": "100000",
            # Cheap password hashing: only the setup hashes passwords; the measured requests never do.
            "COZY_ARGON2_MEMORY_KIB": "256",
            "COZY_ARGON2_ITERATIONS": "1",
        })
        self.env = env
        self.proc = None

    def cli(self, *args, stdin=None):
        r = subprocess.run([self.exe, *args], env=self.env, input=stdin, capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"cozy {' '.join(args)} failed ({r.returncode}):\n{r.stderr}")
        return r.stdout

    def start(self):
        cmd = [self.exe, "serve", "--listen", f"127.0.0.1:{self.port}"]
        if self.workers:
            cmd += ["--workers", str(self.workers)]
        self.stdout = open(self.work / "cozy.stdout", "w")
        self.stderr = open(self.work / "cozy.stderr.jsonl", "w")
        self.proc = subprocess.Popen(cmd, env=self.env, cwd=self.work, stdout=self.stdout, stderr=self.stderr,
                                     start_new_session=True)
        wait_port(self.port, self.proc, "cozy serve", timeout=90)
        # A cluster listens (the master's socket) before its workers are ready.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if api(self.port, "GET", "/healthz", expect=None)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise SystemExit("cozy serve does not answer /healthz")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def api(port, method, path, body=None, token=None, expect=200, host="127.0.0.1"):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Host": host}
    if body is not None:
        headers["Content-Type"] = "application/json"
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if method == "POST" and path.startswith("/v1/reservations"):
        headers["Idempotency-Key"] = secrets.token_hex(12)
    conn.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers)
    res = conn.getresponse()
    raw = res.read()
    conn.close()
    try:
        value = json.loads(raw) if raw else None
    except ValueError:
        value = raw.decode(errors="replace")
    if expect is not None and res.status != expect:
        raise SystemExit(f"{method} {path} on port {port}: expected {expect}, got {res.status}: {value}")
    return res.status, value, dict(res.getheaders())


def make_data(cozy, args):
    """An admin, resources of huge capacity, logged-in users; returns (users [(id, token)], resource ids)."""
    cozy.cli("users", "add", "admin@bench.invalid", "--admin", "--password-stdin", stdin="bench admin password\n")
    _, s, _ = api(cozy.port, "POST", "/v1/sessions", {"email": "admin@bench.invalid",
                                                     "password": "bench admin password"}, expect=201)
    admin = s["token"]
    resources = []
    for i in range(args.resources):
        # Capacity 10^9 and holds of an hour: nothing sells out and no hold expires during the run.
        _, r, _ = api(cozy.port, "POST", "/v1/resources", {"name": f"Bench {i}", "capacity": 1_000_000_000,
                      "price_cents": 2500, "currency": "EUR", "hold_seconds": 3600}, token=admin, expect=201)
        resources.append(r["id"])
    users = []
    for i in range(args.users):
        email = f"client{i}@bench.invalid"
        _, u, _ = api(cozy.port, "POST", "/v1/users", {"email": email, "password": "bench password"}, expect=201)
        _, s, _ = api(cozy.port, "POST", "/v1/sessions", {"email": email, "password": "bench password"},
                      expect=201)
        users.append((u["id"], s["token"]))
    return users, resources


# ---------------------------------------------------------------------------------------------------
# nginx: the rendered tree (B), the hand-written site (C), one main configuration for both


def main_conf(prefix, workers):
    """src/ops/nginx/check.rs's main_conf (Debian 12's /etc/nginx/nginx.conf with every path under the
    prefix), with worker_processes chosen by --nginx-workers."""
    p = prefix
    return f"""# bench/nginx: the main configuration, shaped like Debian's (as `cozy nginx render --check` uses).
worker_processes {workers};
pid {p}/nginx.pid;
error_log {p}/log/error.log;

events {{
    worker_connections 1024;
}}

http {{
    sendfile on;
    tcp_nopush on;
    types_hash_max_size 2048;
    include mime.types;
    default_type application/octet-stream;
    ssl_protocols TLSv1 TLSv1.1 TLSv1.2 TLSv1.3;
    ssl_prefer_server_ciphers on;
    access_log {p}/log/access.log;
    gzip on;
    client_body_temp_path {p}/tmp/body;
    proxy_temp_path {p}/tmp/proxy;
    fastcgi_temp_path {p}/tmp/fastcgi;
    uwsgi_temp_path {p}/tmp/uwsgi;
    scgi_temp_path {p}/tmp/scgi;
    include conf.d/*.conf;
    include sites-enabled/*;
}}
"""


def complete_tree(root, workers):
    """Makes `root` a runnable nginx folder around whatever sites-enabled/ holds (like check::prepare)."""
    for d in ("log", "tmp", "conf.d", "sites-enabled"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "nginx.conf").write_text(main_conf(root, workers))
    mime = Path("/etc/nginx/mime.types")
    (root / "mime.types").write_text(mime.read_text() if mime.exists() else "types {\n    application/json json;\n}\n")


HAND_WRITTEN = """# The reverse proxy as it is usually written by hand (or pasted from a blog): no upstream block, so
# nginx talks HTTP/1.0 to the app and opens a new connection for every request.
server {{
    listen 127.0.0.1:{listen};
    server_name {name};

    location / {{
        proxy_pass http://127.0.0.1:{app};
        proxy_set_header Host $host;
        proxy_set_header X-Real-IP $remote_addr;
        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        proxy_set_header X-Forwarded-Proto $scheme;
    }}
}}
"""


class Nginx:
    def __init__(self, exe, root, port, label):
        self.exe, self.root, self.port, self.label = exe, root, port, label
        self.proc = None

    def start(self):
        t = subprocess.run([self.exe, "-t", "-p", f"{self.root}/", "-e", "stderr", "-c", str(self.root / "nginx.conf")],
                           capture_output=True, text=True)
        if t.returncode != 0:
            raise SystemExit(f"nginx -t refused {self.root}:\n{t.stderr}")
        self.err = open(self.root / "log" / "stderr.log", "w")
        self.proc = subprocess.Popen([self.exe, "-p", f"{self.root}/", "-e", "stderr", "-c", str(self.root / "nginx.conf"),
                                      "-g", "daemon off;"], stdout=self.err, stderr=self.err, start_new_session=True)
        wait_port(self.port, self.proc, f"nginx ({self.label})")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(15)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def render_b(cozy_exe, out, app_port, port, workers, templates=None):
    """The rendered site (B): inventory → `cozy nginx render --check --out` → a runnable folder."""
    log_dir = out / "nginx-log"
    log_dir.mkdir(parents=True, exist_ok=True)
    inv = out / "inventory.yml"
    inv.write_text(f"""# bench/nginx: one app host (the cozy under test) behind the rendered nginx.
hosts:
  app1:
    address: 127.0.0.1
    vars:
      app_listen: 127.0.0.1:{app_port}
groups:
  app: [app1]
vars:
  nginx:
    server_names: [{SERVER_NAME}]
    ports: {{http: {port}}}
    listen_addresses: [127.0.0.1]
    ipv6: false
    log_dir: {log_dir}
    # Far above what wrk sends from its one address: the benchmark measures the proxy, not the limiter.
    rate_limits: {{api: 100000r/s, api_burst: 100000, login: 100000r/s, login_burst: 100000}}
""")
    root = out / "nginx-B"
    env = {k: v for k, v in os.environ.items() if not k.startswith("COZY_")}
    # --check first: nginx -t on the rendered tree in cozy's own scratch folder; --out only if it passes.
    cmd = [cozy_exe, "nginx", "render", "-i", str(inv), "--check", "--out", str(root)]
    if templates:
        cmd += ["--templates", str(Path(templates).resolve())]
    r = subprocess.run(cmd,
                       capture_output=True, text=True, cwd=out, env=env)
    (out / "render.stderr").write_text(r.stderr)
    if r.returncode != 0:
        raise SystemExit(f"cozy nginx render failed ({r.returncode}):\n{r.stderr}")
    log(f"rendered: {r.stderr.strip()}")
    complete_tree(root, workers)
    return root, log_dir


def hand_written_c(out, app_port, port, workers, log_dir):
    root = out / "nginx-C"
    complete_tree(root, workers)
    site = HAND_WRITTEN.format(listen=port, name=SERVER_NAME, app=app_port)
    # The main configuration's combined access log, kept beside B's JSON one.
    site = site.replace("    location / {", f"    access_log {log_dir}/hand-written.access.log;\n\n    location / {{", 1)
    (root / "sites-enabled" / "hand-written.conf").write_text(site)
    return root


# ---------------------------------------------------------------------------------------------------
# One measured run


def run_wrk(args, mode, port, seconds, setup_file, tag, raw_path, roots, names, connections):
    """One wrk run; returns (wrk.lua's figures, CPU seconds of each party, wall seconds, machine busy s)."""
    env = dict(os.environ, BENCH_WRK_MODE=mode, BENCH_WRK_SETUP=str(setup_file), BENCH_WRK_TAG=tag)
    cmd = ["wrk", "-t", str(args.threads), "-c", str(connections), "-d", f"{seconds}s", "--timeout", "10s",
           "-s", str(HERE / "wrk.lua"), f"http://127.0.0.1:{port}/"]
    # wrk's own CPU time: what this process's reaped children used, before and after (nothing else of
    # ours exits meanwhile).
    t0 = os.times()
    before = CpuSnapshot(roots, names)
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    after = CpuSnapshot(roots, names)
    t1 = os.times()
    output = proc.stdout
    raw_path.write_text(" ".join(cmd) + "\n" + output)
    if proc.returncode != 0:
        raise SystemExit(f"wrk failed ({proc.returncode}): {output}")
    line = next((l for l in output.splitlines() if l.startswith("BENCH_JSON ")), None)
    if line is None:
        raise SystemExit(f"no BENCH_JSON line in wrk's output:\n{output}")
    wall, busy, used = after.since(before)
    # wrk has exited by now: its time is in our reaped children's counters (and it was not counted as
    # foreign: it is this process's child, gone from the second snapshot).
    used["wrk"] = (t1.children_user + t1.children_system) - (t0.children_user + t0.children_system)
    used["unattributed"] = max(0.0, busy - sum(v for k, v in used.items() if k not in ("unattributed", "steal")))
    return json.loads(line[len("BENCH_JSON "):]), used, wall, busy


def measure(args, ctx, variant, mode, seconds, label):
    port = ctx["ports"][variant]
    roots = {"cozy": ctx["cozy"].proc.pid}
    if variant in ("B", "C"):
        roots["nginx"] = ctx["nginx"][variant].proc.pid
    names = {"mariadbd": {"mariadbd", "mysqld"}, "redis": {"redis-server"}}
    connections = args.flow_connections if mode == "flow" else args.connections
    tag = f"{ctx['tag']}-{label}"
    w, used, wall, busy = run_wrk(args, mode, port, seconds, ctx["setup_file"], tag,
                                  ctx["out"] / "wrk" / f"{label}.txt", roots, names, connections)
    secs = w["duration_us"] / 1e6
    n = w["paid"] if mode == "flow" else w["requests"]
    socket_errors = sum(w[f"errors_{k}"] for k in ("connect", "read", "write", "timeout"))
    result = {
        "variant": variant, "mode": mode, "label": label,
        "requests": w["requests"], "seconds": secs,
        "rps": w["requests"] / secs,
        # The flow's unit: a reserve answered 201 followed by a pay answered 200 PAID.
        "units": n, "units_per_s": n / secs,
        "p50_ms": w["latency_p50_us"] / 1000, "p90_ms": w["latency_p90_us"] / 1000,
        "p99_ms": w["latency_p99_us"] / 1000, "p99_9_ms": w["latency_p99_9_us"] / 1000,
        "max_ms": w["latency_max_us"] / 1000,
        "non_2xx": w["errors_status"], "socket_errors": socket_errors,
        "errors": {k: w[f"errors_{k}"] for k in ("connect", "read", "write", "timeout", "status")},
        "flow": {k: w[k] for k in ("reserved", "paid", "unparsed", "other_statuses")} if mode == "flow" else None,
        "wall_s": wall, "machine_busy_cores": busy / wall,
        "cpu_s": used,
        "cpu_ms_per_request": {k: 1000 * v / max(1, w["requests"]) for k, v in used.items()},
        "cores": {k: v / wall for k, v in used.items()},
    }
    result["disturbance_cores"] = sum(result["cores"][k] for k in ("foreign", "unattributed", "steal"))
    result["disturbed"] = result["disturbance_cores"] > args.disturbed_cores
    log_lines = ctx["truncate_logs"]()
    result["nginx_access_log_lines"] = log_lines.get(variant)
    log(f"{label}: {LABELS[variant]:18} {mode:4} {result['rps']:8.1f} req/s"
        + (f" {result['units_per_s']:7.1f} flows/s" if mode == "flow" else "")
        + f"  p50 {result['p50_ms']:6.2f} p99 {result['p99_ms']:7.2f} ms  non-2xx {result['non_2xx']}"
        f" socket errors {socket_errors}  machine {result['machine_busy_cores']:.2f} cores"
        f" (cozy {result['cores']['cozy']:.2f}, nginx {result['cores'].get('nginx', 0):.2f},"
        f" wrk {result['cores']['wrk']:.2f}, mariadbd {result['cores']['mariadbd']:.2f},"
        f" redis {result['cores']['redis']:.2f}, unattributed {result['cores']['unattributed']:.2f},"
        f" foreign {result['cores']['foreign']:.2f}, steal {result['cores']['steal']:.2f})" + ("  DISTURBED" if result["disturbed"] else ""))
    return result


# ---------------------------------------------------------------------------------------------------
# Report


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(runs, modes):
    s = {}
    for mode in modes:
        s[mode] = {}
        for v in VARIANTS:
            rs = [r for r in runs if r["mode"] == mode and r["variant"] == v]
            if not rs:
                continue
            parties = sorted({k for r in rs for k in r["cpu_ms_per_request"]})
            s[mode][v] = {
                "rounds": len(rs),
                "rps": med([r["rps"] for r in rs]),
                "units_per_s": med([r["units_per_s"] for r in rs]),
                "p50_ms": med([r["p50_ms"] for r in rs]),
                "p99_ms": med([r["p99_ms"] for r in rs]),
                "rps_each": [round(r["rps"], 1) for r in rs],
                "p99_each": [round(r["p99_ms"], 2) for r in rs],
                "non_2xx": sum(r["non_2xx"] for r in rs),
                "disturbed_runs": sum(1 for r in rs if r["disturbed"]),
                "socket_errors": sum(r["socket_errors"] for r in rs),
                "machine_busy_cores": med([r["machine_busy_cores"] for r in rs]),
                "cpu_ms_per_request": {k: med([r["cpu_ms_per_request"].get(k) for r in rs]) for k in parties},
                "cores": {k: med([r["cores"].get(k) for r in rs]) for k in parties},
            }
        by_round = {}
        for r in runs:
            if r["mode"] == mode:
                by_round.setdefault(r["round"], {})[r["variant"]] = r
        for a, b in (("B", "A"), ("B", "C"), ("C", "A")):
            if a in s[mode] and b in s[mode]:
                pairs = [(x[a], x[b]) for _, x in sorted(by_round.items()) if a in x and b in x]
                each = [ra["rps"] / rb["rps"] for ra, rb in pairs]
                clean = [ra["rps"] / rb["rps"] for ra, rb in pairs if not (ra["disturbed"] or rb["disturbed"])]
                s[mode][f"{a}/{b}"] = {
                    "of_medians": s[mode][a]["rps"] / s[mode][b]["rps"],
                    "per_round": [round(x, 3) for x in each],
                    "per_round_disturbed": [ra["disturbed"] or rb["disturbed"] for ra, rb in pairs],
                    "median_per_round": med(each),
                    # Rounds in which neither run was disturbed: the figure to trust on a shared machine.
                    "median_clean_rounds": med(clean),
                    "clean_rounds": len(clean),
                }
    return s


def fmt(v, digits=1):
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def md_table(head, rows):
    widths = [max(len(str(x[i])) for x in [head, *rows]) for i in range(len(head))]
    lines = ["| " + " | ".join(str(h).ljust(w) for h, w in zip(head, widths)) + " |",
             "| " + " | ".join("-" * w for w in widths) + " |"]
    for r in rows:
        lines.append("| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |")
    return lines


def table(summary, args):
    lines = []
    parties = ("wrk", "nginx", "cozy", "mariadbd", "redis", "unattributed", "foreign", "steal")
    for mode in summary["modes"]:
        S = summary["by_mode"][mode]
        title = ("GET /v1/resources/{id}" if mode == "get" else "reserve + pay (2 requests per flow)")
        conns = args.flow_connections if mode == "flow" else args.connections
        lines.append(f"{title}: wrk -t{args.threads} -c{conns} -d{args.duration}s, {args.rounds} rounds, medians")
        lines.append("")
        head = ["variant", "req/s"] + (["flows/s"] if mode == "flow" else []) + \
               ["p50 ms", "p99 ms", "non-2xx", "socket errors", "disturbed runs", "req/s per round", "p99 ms per round"]
        rows = []
        for v in VARIANTS:
            if v in S:
                r = S[v]
                rows.append([f"{v} {LABELS[v]}", fmt(r["rps"])] + ([fmt(r["units_per_s"])] if mode == "flow" else []) +
                            [fmt(r["p50_ms"], 2), fmt(r["p99_ms"], 2), fmt(r["non_2xx"]), fmt(r["socket_errors"]),
                             f"{r['disturbed_runs']}/{r['rounds']}",
                             " / ".join(map(str, r["rps_each"])), " / ".join(map(str, r["p99_each"]))])
        lines += md_table(head, rows)
        lines.append("")
        lines.append("CPU per request in ms (and cores used meanwhile), medians:")
        lines.append("")
        head = ["variant", "machine busy cores", *parties]
        rows = []
        for v in VARIANTS:
            if v in S:
                r = S[v]
                rows.append([f"{v} {LABELS[v]}", fmt(r["machine_busy_cores"], 2)] +
                            [f"{fmt(r['cpu_ms_per_request'].get(p), 3)} ({fmt(r['cores'].get(p), 2)})"
                             if r["cpu_ms_per_request"].get(p) is not None else "–" for p in parties])
        lines += md_table(head, rows)
        lines.append("")
        for key in ("B/A", "B/C", "C/A"):
            if key in S:
                R = S[key]
                each = ", ".join(f"{x:.3f}" + ("*" if d else "") for x, d in zip(R["per_round"], R["per_round_disturbed"]))
                lines.append(f"{key} req/s: {R['of_medians']:.3f} of the medians; per round {each} "
                             f"(* disturbed); median of the {R['clean_rounds']} undisturbed rounds "
                             f"{fmt(R['median_clean_rounds'], 3)}")
        if "A" in S and "B" in S:
            verdict = "met" if S["B/A"]["of_medians"] >= 0.85 else "NOT met"
            beats = ("yes" if S["B/C"]["of_medians"] > 1 else "no") if "B/C" in S else "–"
            lines.append(f"goal B >= 0.85 A: {verdict}; B beats C: {beats}")
        lines.append("")
    return "\n".join(lines)


def machine_info(cozy_exe, nginx_exe):
    def cmd(*c):
        try:
            r = subprocess.run(c, capture_output=True, text=True)
            return (r.stdout + r.stderr).strip()
        except OSError:
            return "n/a"
    model = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "os": cmd("sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"),
        "nginx": cmd(nginx_exe, "-v"),
        "wrk": cmd("sh", "-c", "wrk --version 2>&1 | head -1"),
        "mariadb": cmd("mysql", "--version"),
        "redis": cmd("sh", "-c", "redis-server --version 2>/dev/null || echo n/a"),
        "git": cmd("git", "-C", str(REPO), "describe", "--always", "--dirty"),
        "cozy_binary_sha256": hashlib.sha256(open(cozy_exe, "rb").read()).hexdigest(),
        "load_before": open("/proc/loadavg").read().strip(),
    }


# ---------------------------------------------------------------------------------------------------


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cozy", default=str(REPO / "target" / "release" / "cozy"))
    p.add_argument("--nginx", default=shutil.which("nginx") or "/usr/sbin/nginx")
    p.add_argument("--mysql-url", default=os.environ.get("COZY_TEST_MYSQL_URL", "mysql://cozy:cozy@127.0.0.1:3306"))
    p.add_argument("--redis-url", default=os.environ.get("COZY_TEST_REDIS_URL", "redis://127.0.0.1:6379"))
    p.add_argument("--duration", type=int, default=10, help="seconds per measured wrk run")
    p.add_argument("--warmup", type=int, default=3, help="seconds of one unmeasured run per variant and workload")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--connections", type=int, default=32, help="wrk connections for the GET")
    p.add_argument("--flow-connections", type=int, default=32, help="wrk connections for reserve + pay")
    p.add_argument("--users", type=int, default=32)
    p.add_argument("--resources", type=int, default=64)
    p.add_argument("--get-resources", type=int, default=8, help="how many of the resources the GET cycles over")
    p.add_argument("--nginx-workers", default="1",
                   help="worker_processes of both nginx (B and C); default 1, as in `cozy nginx render --check`'s "
                        "main configuration: nginx never needs a whole core here, and a second worker only adds a "
                        "process competing for the 2 cores (Debian's own default is auto)")
    p.add_argument("--cozy-workers", type=int, default=0,
                   help="0: one `cozy serve` process (its tokio runtime uses every core); N: --workers N")
    p.add_argument("--only", default="get,flow", help="workloads: get, flow")
    p.add_argument("--templates", default=None, metavar="DIR",
                   help="render B with `cozy nginx render --templates DIR` (to measure a change to the templates)")
    p.add_argument("--variants", default="A,B,C")
    p.add_argument("--wait-quiet", type=float, default=0, metavar="MINUTES",
                   help="before measuring, wait up to this long for 10 s in which the machine is busy less than "
                        "--disturbed-cores")
    p.add_argument("--retry-disturbed", type=int, default=0, metavar="N",
                   help="measure a round again (up to N times, after --wait-quiet) when foreign processes used "
                        "more than --disturbed-cores during one of its runs (see --disturbed-cores)")
    p.add_argument("--disturbed-cores", type=float, default=0.15,
                   help="foreign + unattributed + stolen CPU (cores, averaged over a run) above which a run is "
                        "disturbed (default 0.15: 7.5 %% of 2 cores; a quiet machine shows about 0.05)")
    p.add_argument("--results", default=None)
    p.add_argument("--workdir", default=None)
    p.add_argument("--keep-workdir", action="store_true")
    p.add_argument("--keep-db", action="store_true")
    p.add_argument("--report", default=None, metavar="RESULTS_DIR",
                   help="measure nothing: print the table of an earlier run again from its summary.json")
    args = p.parse_args()
    if args.report:
        summary = json.load(open(Path(args.report) / "summary.json"))
        summary["by_mode"] = summarize(summary["runs"], summary["modes"])
        print(table(summary, argparse.Namespace(**summary["args"])))
        return

    out = Path(args.results) if args.results else HERE / "results" / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out.mkdir(parents=True, exist_ok=True)
    (out / "wrk").mkdir(exist_ok=True)
    work = Path(args.workdir or f"/tmp/cozy-bench-nginx-{os.getpid()}")
    work.mkdir(parents=True, exist_ok=True)
    log(f"results in {out}, scratch in {work}")
    # The target directory is shared: measure a private copy, which nobody's build replaces mid-run.
    built = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(os.path.getmtime(args.cozy)))
    shutil.copy2(args.cozy, work / "cozy")
    exe = str(work / "cozy")
    modes = [m for m in ("get", "flow") if m in args.only.split(",")]
    variants = [v for v in VARIANTS if v in args.variants.split(",")]
    summary = {"args": vars(args), "machine": machine_info(exe, args.nginx), "runs": []}
    summary["machine"]["cozy_binary_built"] = built

    db = f"cozy_bench_nginx_{secrets.token_hex(4)}"
    mysql_cli(args.mysql_url, f"CREATE DATABASE {db}")
    cozy = nginx_b = nginx_c = None
    try:
        db_url = args.mysql_url.rstrip("/") + "/" + db
        ports = {"A": free_port(), "B": free_port(), "C": free_port()}
        cozy = Cozy(exe, work, ports["A"], db_url, args.redis_url, args.cozy_workers)
        cozy.cli("migrate", "up")
        cozy.start()
        log(f"cozy serve on 127.0.0.1:{ports['A']} ({'--workers %d' % args.cozy_workers if args.cozy_workers else 'one process'}), database {db}")
        users, resources = make_data(cozy, args)
        setup_file = work / "wrk-setup.txt"
        setup_file.write_text(f"host {SERVER_NAME}\n" + "".join(f"user {u} {t}\n" for u, t in users)
                              + "".join(f"resource {r}\n" for r in resources))
        get_file = work / "wrk-setup-get.txt"
        get_file.write_text(f"host {SERVER_NAME}\n" + "".join(f"user {u} {t}\n" for u, t in users)
                            + "".join(f"resource {r}\n" for r in resources[:args.get_resources]))

        root_b, log_dir = render_b(exe, out, ports["A"], ports["B"], args.nginx_workers, args.templates)
        root_c = hand_written_c(out, ports["A"], ports["C"], args.nginx_workers, log_dir)
        nginx_b = Nginx(args.nginx, root_b, ports["B"], "rendered")
        nginx_c = Nginx(args.nginx, root_c, ports["C"], "hand-written")
        nginx_b.start()
        nginx_c.start()

        # Sanity: the same resource through each path, and B really is the rendered config.
        token = users[0][1]
        for v in variants:
            st, body, headers = api(ports[v], "GET", f"/v1/resources/{resources[0]}", token=token, host=SERVER_NAME)
            if body.get("id") != resources[0]:
                raise SystemExit(f"{v}: unexpected answer {body}")
            if v == "B":
                if "X-Request-Id" not in headers:
                    raise SystemExit(f"B: no X-Request-Id header, is this the rendered site? {headers}")
                summary["sample_headers_B"] = headers
                # The flow's first step through the rendered site (a POST, with the rate limits on).
                api(ports["B"], "POST", "/v1/reservations", {"resource_id": resources[0], "quantity": 1},
                    token=token, host=SERVER_NAME, expect=201)

        def truncate_logs():
            """Counts and empties the access logs after each run (a GET run writes tens of MB of them)."""
            counts = {}
            for v, name in (("B", "cozy.access.log"), ("C", "hand-written.access.log")):
                path = log_dir / name
                if path.exists():
                    with open(path, "rb") as f:
                        counts[v] = sum(1 for _ in f)
                    sample = out / f"nginx-{v}-access-sample.log"
                    if not sample.exists() and counts[v] > 2:
                        with open(path, "rb") as f:
                            sample.write_bytes(b"".join(f.readline() for _ in range(3)))
                    os.truncate(path, 0)
            err = work / "cozy.stderr.jsonl"
            if err.exists() and err.stat().st_size > 20_000_000:
                os.truncate(err, 0)
            return counts

        truncate_logs()
        ctx = {"cozy": cozy, "nginx": {"B": nginx_b, "C": nginx_c}, "ports": ports, "out": out,
               "setup_file": setup_file, "tag": secrets.token_hex(4), "truncate_logs": truncate_logs}

        if args.wait_quiet:
            wait_quiet(args.wait_quiet, args.disturbed_cores)
        if args.warmup:
            for mode in modes:
                for v in variants:
                    c = dict(ctx, setup_file=get_file if mode == "get" else setup_file)
                    measure(args, c, v, mode, args.warmup, f"warmup-{mode}-{v}")
        summary["discarded_runs"] = []
        for rnd in range(1, args.rounds + 1):
            k = (rnd - 1) % len(variants)
            order = variants[k:] + variants[:k]
            for attempt in range(1, args.retry_disturbed + 2):
                if attempt > 1 and args.wait_quiet:
                    wait_quiet(args.wait_quiet, args.disturbed_cores)
                runs = []
                for mode in modes:
                    c = dict(ctx, setup_file=get_file if mode == "get" else setup_file)
                    for v in order:
                        r = measure(args, c, v, mode, args.duration, f"r{rnd}-{mode}-{v}" + (f"-try{attempt}" if attempt > 1 else ""))
                        r["round"], r["attempt"] = rnd, attempt
                        runs.append(r)
                disturbed = [r["label"] for r in runs if r["disturbed"]]
                if disturbed and attempt <= args.retry_disturbed:
                    log(f"round {rnd}: disturbed ({', '.join(disturbed)}), measuring it again")
                    summary["discarded_runs"] += runs
                    continue
                summary["runs"] += runs
                break
            with open(out / "summary.json", "w") as f:  # so far: an interrupted run keeps what it measured
                json.dump(summary, f, indent=1)
    finally:
        for n in (nginx_b, nginx_c):
            if n:
                n.stop()
        if cozy:
            cozy.stop()
            shutil.copy2(work / "cozy.stdout", out / "cozy.stdout") if (work / "cozy.stdout").exists() else None
            subprocess.run(["sh", "-c", f"tail -n 50 '{work}/cozy.stderr.jsonl' > '{out}/cozy.stderr.tail.jsonl'"])
        if not args.keep_db:
            try:
                mysql_cli(args.mysql_url, f"DROP DATABASE IF EXISTS {db}")
            except subprocess.CalledProcessError:
                log(f"could not drop database {db}")
        if not args.keep_workdir:
            shutil.rmtree(work, ignore_errors=True)

    summary["machine"]["load_after"] = open("/proc/loadavg").read().strip()
    summary["modes"] = modes
    summary["by_mode"] = summarize(summary["runs"], modes)
    with open(out / "summary.json", "w") as f:
        json.dump(summary, f, indent=1)
    text = (f"nginx proxy overhead, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
            f"{summary['machine']['nginx']}, nginx worker_processes {args.nginx_workers}, "
            f"cozy {'--workers %d' % args.cozy_workers if args.cozy_workers else 'one process'}; "
            f"{summary['machine']['cpus']} CPUs, load before {summary['machine']['load_before']}\n\n"
            + table(summary, args))
    (out / "summary.txt").write_text(text + "\n")
    print(text)
    print(f"raw outputs: {out}")


if __name__ == "__main__":
    main()
