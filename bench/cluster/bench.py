#!/usr/bin/env python3
"""Supervised cluster vs PM2: reload under load, and restart after kill -9 (issue 3).

Not a test: a measurement run on demand through `bench/cluster/run`, which checks the prerequisites and
then calls `bench.py all`. Everything of one run lands in `bench/cluster/results/<UTC time>/`; the
side-by-side table is printed at the end and saved as `summary.txt` (figures in `summary.json`).

The pieces:
- a *target* is one way of running a supervised HTTP service on 127.0.0.1: `cozy serve --workers N`, or
  PM2 in cluster mode over `server.js` (plain, or with PM2's documented graceful-stop handler). Each one
  can start, reload, stop, and report which pid serves which worker slot;
- the *prober* (`bench.py probe`, a separate process so that it has its own interpreter lock) sends
  `GET /healthz` on a fresh connection every few milliseconds, without waiting for earlier answers, and
  writes one line per request: send time, completion time, outcome. Its clock is CLOCK_MONOTONIC, shared
  by every process on the machine, so its lines can be lined up with the reload and kill times;
- a *status watcher* samples the target's own view of its workers (what `cozy status --json` and
  `pm2 jlist` show, asked over each one's control socket from a long-lived client) to time when a
  replacement process is reported online.

Two scenarios per target:
1. reload under load: wrk (2 threads, 32 keep-alive connections) plus the prober (every 10 ms); the reload
   command runs at `--reload-at` seconds (and again `--reload-gap` s after it ends, `--reloads` times in
   all, if they fit in the load); wrk's totals cover the whole run, the prober's figures are split into
   "steady" (before the first reload), "during the reload" (from a command's start to its end) and
   "reload start + 2 s" (a window of the same length for every target, however fast its reload);
2. kill -9: with 1 worker, then 2, the first worker's process is killed `--kills` times, 3 s apart, while
   the prober runs every 5 ms (no other load). Per kill: failed probes, time until the first request sent
   after the kill is answered, longest time without any successful answer, time until the status shows
   a new online process in the slot.

The machine is usually shared, so every scenario also reports how much CPU other processes took meanwhile
(`ForeignCpu`) and is flagged "disturbed" above 5 % of the CPUs; `--wait-quiet` and `--retry-disturbed`
wait for, and retry in, quiet moments. The prober's own lateness is reported too: a prober starved of CPU
shows up as its lag, not as a slow server.
"""

import argparse
import asyncio
import hashlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
PM2 = HERE / "node_modules" / ".bin" / "pm2"


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------------
# The prober


REQUEST = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"


async def probe_once(port, timeout, scheduled):
    """One request on a fresh connection; returns (send time, completion time, outcome, lag ms), where lag
    is how late the prober itself sent it (a prober starved of CPU shows up here, not as a slow server)."""
    t0 = time.monotonic()
    writer = None
    try:
        async def exchange():
            nonlocal writer
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(REQUEST)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value.strip())
            await reader.readexactly(length)
            return status

        status = await asyncio.wait_for(exchange(), timeout)
        outcome = "ok" if status == 200 else f"status_{status}"
    except asyncio.TimeoutError:
        outcome = "timeout"
    except ConnectionRefusedError:
        outcome = "refused"
    except ConnectionResetError:
        outcome = "reset"
    except asyncio.IncompleteReadError:
        outcome = "closed_early"
    except OSError as e:
        outcome = f"oserror_{e.errno}"
    except Exception as e:  # a malformed answer is a failed request too
        outcome = f"error_{type(e).__name__}"
    finally:
        if writer is not None:
            writer.close()
    return (t0, time.monotonic(), outcome, round((t0 - scheduled) * 1000, 3))


async def probe_main(port, interval, timeout, out_path):
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    results = []
    pending = set()

    def collect(task):
        pending.discard(task)
        results.append(task.result())

    start = time.monotonic()
    k = 0
    while not stop.is_set():
        task = asyncio.create_task(probe_once(port, timeout, start + k * interval))
        pending.add(task)
        task.add_done_callback(collect)
        k += 1
        delay = start + k * interval - time.monotonic()
        if delay > 0:
            try:
                await asyncio.wait_for(stop.wait(), delay)
            except asyncio.TimeoutError:
                pass
    if pending:
        await asyncio.wait(set(pending))
    results.sort()
    with open(out_path, "w") as f:
        for r in results:
            f.write(json.dumps(r) + "\n")


class Prober:
    """The prober as a child process: start, then stop() returns its records."""

    def __init__(self, port, interval_ms, out_path, timeout_s=5.0):
        self.out_path = out_path
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "probe", "--port", str(port), "--interval-ms", str(interval_ms),
             "--timeout-s", str(timeout_s), "--out", str(out_path)])

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=30)
        with open(self.out_path) as f:
            return [json.loads(line) for line in f]


# ---------------------------------------------------------------------------------------------------
# Status watchers: the target's own view of its workers, as (time, {slot: (pid, state)}) samples


class Watcher:
    def __init__(self, interval):
        self.interval = interval
        self.samples = []
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def add(self, t, slots):
        with self.lock:
            self.samples.append((t, slots))

    def latest(self):
        with self.lock:
            return self.samples[-1] if self.samples else (None, {})

    def wait_for(self, predicate, after, timeout):
        """Waits for a sample taken after `after` that satisfies predicate(slots); returns its time or None."""
        deadline = time.monotonic() + timeout
        seen = 0
        while time.monotonic() < deadline:
            with self.lock:
                fresh = self.samples[seen:]
                seen = len(self.samples)
            for t, slots in fresh:
                if t > after and predicate(slots):
                    return t
            time.sleep(0.002)
        return None

    def stop(self):
        self.done.set()
        self.thread.join(timeout=10)


class CozyWatcher(Watcher):
    """Asks the master for its status every `interval`: the request `cozy status --json` sends over the
    control socket (`{"cmd":"status"}`), from this long-lived process rather than from a new CLI process
    per sample, as pm2-watch.js does for PM2. A sample is stamped when the answer has arrived."""

    def __init__(self, target, interval):
        self.target = target
        self.call_ms = []
        super().__init__(interval)

    def ask(self):
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(self.target.tmp / "run" / "cozy.sock"))
            s.sendall(b'{"cmd":"status"}\n')
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        return json.loads(data)

    def run(self):
        while not self.done.is_set():
            t0 = time.monotonic()
            try:
                reply = self.ask()
            except (OSError, ValueError):
                reply = None
            t1 = time.monotonic()
            if reply and reply.get("ok"):
                self.call_ms.append((t1 - t0) * 1000)
                slots = {}
                for w in reply["status"]["workers"]:
                    # During a replacement a slot has two processes; keep the online one.
                    if w["id"] not in slots or w["state"] == "online":
                        slots[w["id"]] = (w["pid"], w["state"])
                self.add(t1, slots)
            time.sleep(max(0.0, self.interval - (time.monotonic() - t0)))


class Pm2Watcher(Watcher):
    """Reads pm2-watch.js's lines (PM2's process list every `interval`); a sample is stamped when read."""

    def __init__(self, target, interval):
        self.target = target
        self.proc = subprocess.Popen(["node", str(HERE / "pm2-watch.js"), str(int(interval * 1000))], env=target.env,
                                     cwd=HERE, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        super().__init__(interval)

    def run(self):
        for line in self.proc.stdout:
            t = time.monotonic()
            try:
                rows = json.loads(line)
            except ValueError:
                continue  # not one of ours (a notice printed by PM2's client)
            # Slot = pm_id; the worker being replaced by a reload shows up as "_old_<id>".
            self.add(t, {r[0]: (r[1], r[2]) for r in rows if isinstance(r[0], int)})
            if self.done.is_set():
                break

    def stop(self):
        self.done.set()
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.thread.join(timeout=10)


MARK = "BENCH_CLUSTER_MARK"


class ForeignCpu:
    """CPU time used meanwhile by processes that are not part of the measurement (the machine is shared:
    another engineer's build or test suite). Everything this run starts carries the environment variable
    MARK (PM2's daemon and workers inherit it from the pm2 command, cozy's workers from the master); any
    other process with an environment counts as foreign (kernel threads, which have none, do not).
    Sampled every 0.5 s, so a foreign process that lives less than that is missed."""

    def __init__(self):
        self.mark = f"{MARK}={os.environ[MARK]}".encode()
        self.tick = os.sysconf("SC_CLK_TCK")
        self.first = {}
        self.last = {}
        self.names = {}
        self.done = threading.Event()
        self.sample(initial=True)
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def sample(self, initial=False):
        for pid in os.listdir("/proc"):
            if not pid.isdigit() or int(pid) == os.getpid():
                continue
            try:
                if pid not in self.last:
                    env = open(f"/proc/{pid}/environ", "rb").read()
                    if not env or self.mark in env.split(b"\0"):
                        continue
                    self.names[pid] = open(f"/proc/{pid}/comm").read().strip()
                fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            cpu = int(fields[11]) + int(fields[12])  # utime + stime
            self.first.setdefault(pid, cpu if initial else 0)
            self.last[pid] = cpu

    def run(self):
        while not self.done.wait(0.5):
            self.sample()

    def stop(self):
        """Stops sampling; returns (foreign CPU seconds since the start, the biggest users)."""
        self.done.set()
        self.thread.join()
        self.sample()
        used = {}
        for pid in self.last:
            name = self.names[pid]
            used[name] = used.get(name, 0) + (self.last[pid] - self.first[pid]) / self.tick
        top = sorted(((round(v, 1), k) for k, v in used.items() if v > 0), reverse=True)[:5]
        return sum(used.values()), top


# ---------------------------------------------------------------------------------------------------
# Targets


def http_ok(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(REQUEST)
            return s.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


class Cozy:
    name = "cozy"
    online_state = "online"

    def __init__(self, exe, workdir, workers, port, redis_url, extra_env=None):
        self.exe = str(exe)
        self.workers = workers
        self.port = port
        self.tmp = workdir
        self.tmp.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("COZY_")}
        env.update({
            "COZY_RUN_DIR": str(self.tmp / "run"),
            "COZY_DATA_DIR": str(self.tmp / "data"),
            "COZY_REDIS_URL": redis_url,
            "COZY_LOG_FORMAT": "json",
        })
        env.update(extra_env or {})
        self.env = env
        self.proc = None

    def describe(self):
        return f"cozy serve --workers {self.workers}"

    def start(self, watch_interval):
        self.stdout = open(self.tmp / "cozy.stdout", "w")
        self.stderr = open(self.tmp / "cozy.stderr.jsonl", "w")
        self.proc = subprocess.Popen(
            [self.exe, "serve", "--listen", f"127.0.0.1:{self.port}", "--workers", str(self.workers)],
            env=self.env, cwd=self.tmp, stdout=self.stdout, stderr=self.stderr, start_new_session=True)
        self.watcher = CozyWatcher(self, watch_interval)
        self.wait_started()

    def wait_started(self, timeout=90):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"cozy serve exited with {self.proc.returncode}; see {self.tmp}")
            _, slots = self.watcher.latest()
            online = [s for s in slots.values() if s[1] == self.online_state]
            if len(online) == self.workers and http_ok(self.port):
                return
            time.sleep(0.05)
        raise RuntimeError(f"{self.describe()} did not start within {timeout} s")

    def reload(self):
        return subprocess.run([self.exe, "reload"], env=self.env, cwd=self.tmp, capture_output=True, text=True)

    def stop(self):
        self.watcher.stop()
        subprocess.run([self.exe, "stop"], env=self.env, cwd=self.tmp, capture_output=True, timeout=60)
        try:
            self.proc.wait(timeout=45)
        except subprocess.TimeoutExpired:
            self.proc.kill()  # the master only; its workers die with it (parent-death signal)
            self.proc.wait()
        self.stdout.close()
        self.stderr.close()

    def logs(self):
        return [self.tmp / "cozy.stderr.jsonl", self.tmp / "cozy.stdout"]

    def first_slot(self):
        return 1


class Pm2:
    online_state = "online"

    def __init__(self, workdir, workers, port, graceful, kill_timeout_ms=None):
        self.name = "pm2+graceful" if graceful else "pm2"
        self.workers = workers
        self.port = port
        self.graceful = graceful
        self.kill_timeout_ms = kill_timeout_ms
        self.tmp = workdir
        self.tmp.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env.update({"PM2_HOME": str(self.tmp / "pm2home"), "PORT": str(port),
                    "BENCH_GRACEFUL": "1" if graceful else "0"})
        self.env = env

    def describe(self):
        extra = f" --kill-timeout {self.kill_timeout_ms}" if self.kill_timeout_ms else ""
        return f"pm2 start server.js -i {self.workers}{extra}" + (" (BENCH_GRACEFUL=1)" if self.graceful else "")

    def pm2(self, *args, check=True):
        r = subprocess.run([str(PM2), *args], env=self.env, cwd=HERE, capture_output=True, text=True)
        with open(self.tmp / "pm2-cli.log", "a") as f:
            f.write(f"$ pm2 {' '.join(args)}\n{r.stdout}{r.stderr}\n")
        if check and r.returncode != 0:
            raise RuntimeError(f"pm2 {' '.join(args)} failed: {r.stderr}")
        return r

    def start(self, watch_interval):
        args = ["start", str(HERE / "server.js"), "-i", str(self.workers), "--name", "bench"]
        if self.kill_timeout_ms:
            args += ["--kill-timeout", str(self.kill_timeout_ms)]
        self.pm2(*args)
        self.watcher = Pm2Watcher(self, watch_interval)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            _, slots = self.watcher.latest()
            online = [s for s in slots.values() if s[1] == self.online_state]
            if len(online) == self.workers and http_ok(self.port):
                return
            time.sleep(0.05)
        raise RuntimeError(f"{self.describe()} did not start")

    def reload(self):
        return self.pm2("reload", "bench", check=False)

    def stop(self):
        self.watcher.stop()
        self.pm2("kill", check=False)

    def logs(self):
        home = self.tmp / "pm2home"
        return [home / "pm2.log", *sorted((home / "logs").glob("*.log")), self.tmp / "pm2-cli.log"]

    def first_slot(self):
        return 0


# ---------------------------------------------------------------------------------------------------
# Figures


def pct(values, p):
    if not values:
        return None
    values = sorted(values)
    k = (len(values) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def probe_stats(records):
    ok = [(r[1] - r[0]) * 1000 for r in records if r[2] == "ok"]
    failed = {}
    for r in records:
        o = r[2]
        if o != "ok":
            failed[o] = failed.get(o, 0) + 1
    return {
        "requests": len(records),
        "failed": sum(failed.values()),
        "failed_by_kind": failed,
        "p50_ms": pct(ok, 50),
        "p99_ms": pct(ok, 99),
        "max_ms": max(ok) if ok else None,
        "prober_max_lag_ms": max((r[3] for r in records), default=None),
    }


def run_wrk(args, port, seconds, out_path):
    cmd = ["wrk", "-t", str(args.threads), "-c", str(args.connections), "-d", f"{seconds}s", "--timeout", "2s",
           "--latency", "-s", str(HERE / "count.lua"), f"http://127.0.0.1:{port}/healthz"]
    return subprocess.Popen(cmd, stdout=open(out_path, "w"), stderr=subprocess.STDOUT)


def wrk_json(path):
    for line in open(path):
        if line.startswith("WRK_JSON "):
            return json.loads(line[len("WRK_JSON "):])
    raise RuntimeError(f"no WRK_JSON line in {path}")


def reload_scenario(args, target, out):
    """wrk + prober; the first reload at args.reload_at seconds, the next ones args.reload_gap after the end
    of the previous one (one at a time, as long as one still fits in the load)."""
    log(f"{target.name}: reload under load ({target.describe()})")
    target.start(watch_interval=0.2)
    reloads = []
    try:
        before = {k: v[0] for k, v in target.watcher.latest()[1].items()}
        warm = run_wrk(args, target.port, 3, out / f"{target.name}-warmup-wrk.txt")
        warm.wait()
        prober = Prober(target.port, 10, out / f"{target.name}-reload-probes.jsonl")
        time.sleep(0.2)
        t_load = time.monotonic()
        wrk = run_wrk(args, target.port, args.duration, out / f"{target.name}-reload-wrk.txt")
        time.sleep(args.reload_at)
        with open(out / f"{target.name}-reload-command.txt", "w") as f:
            while len(reloads) < args.reloads:
                t0 = time.monotonic()
                r = target.reload()
                t1 = time.monotonic()
                reloads.append({"t0": t0, "t1": t1, "exit": r.returncode})
                f.write(f"reload {len(reloads)} at {t0 - t_load:.3f} s, {t1 - t0:.3f} s, exit {r.returncode}\n"
                        f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}\n")
                if time.monotonic() + args.reload_gap + (t1 - t0) + 1 > t_load + args.duration:
                    break
                time.sleep(args.reload_gap)
        wrk.wait()
        t_end = time.monotonic()
        time.sleep(0.2)
        records = prober.stop()
        time.sleep(1.5)  # let the status catch up with the last replacement
        after = {k: v[0] for k, v in target.watcher.latest()[1].items()}
    finally:
        target.stop()
    for p in target.logs():
        if p.exists():
            shutil.copy(p, out / f"{target.name}-reload-{p.name}")
    w = wrk_json(out / f"{target.name}-reload-wrk.txt")
    e = w["errors"]
    failed = e["connect"] + e["read"] + e["write"] + e["timeout"] + e["non_200"]
    during = [r for r in records if any(x["t0"] <= r[0] <= x["t1"] for x in reloads)]
    after2s = [r for r in records if any(x["t0"] <= r[0] <= x["t0"] + 2 for x in reloads)]
    steady = [r for r in records if r[0] < reloads[0]["t0"]]
    durations = [x["t1"] - x["t0"] for x in reloads]
    result = {
        "command": target.describe(),
        "reloads": len(reloads),
        "reload_exits": [x["exit"] for x in reloads],
        "reload_s": durations,
        "reload_s_max": max(durations),
        "reload_started_at_s": [x["t0"] - t_load for x in reloads],
        "reloads_done_before_load_end": reloads[-1]["t1"] < t_end,
        "pids_before": before,
        "pids_after": after,
        "all_workers_replaced": bool(after) and not (set(before.values()) & set(after.values())),
        "wrk": w,
        "wrk_failed": failed,
        "rps": w["requests"] / (w["duration_us"] / 1e6),
        "probes_all": probe_stats(records),
        "probes_steady": probe_stats(steady),
        "probes_during_reload": probe_stats(during),
        "probes_reload_2s": probe_stats(after2s),
        "failed_probes_rel_load_start_s": [[round(r[0] - t_load, 3), round(r[1] - t_load, 3), r[2]]
                                           for r in records if r[2] != "ok"],
        "reloads_rel_load_start_s": [[round(x["t0"] - t_load, 3), round(x["t1"] - t_load, 3)] for x in reloads],
        "t_load": [t_load, t_end],
    }
    log(f"{target.name}: {w['requests']} requests, {failed} failed (wrk), {result['probes_all']['failed']} failed "
        f"probes, {len(reloads)} reload(s), longest {max(durations):.2f} s, exits {result['reload_exits']}")
    return result


def kill_scenario(args, target, out):
    """kill -9 the first worker args.kills times, 3 s apart, probing every 5 ms."""
    tag = f"{target.name}-kill{target.workers}"
    log(f"{target.name}: kill -9 with {target.workers} worker(s) ({target.describe()})")
    target.start(watch_interval=0.01)
    kills = []
    try:
        prober = Prober(target.port, 5, out / f"{tag}-probes.jsonl")
        slot = target.first_slot()
        for _ in range(args.kills):
            time.sleep(3)
            _, slots = target.watcher.latest()
            old_pid = slots[slot][0]
            if old_pid is None or slots[slot][1] != target.online_state:
                raise RuntimeError(f"{target.name}: worker slot {slot} is not online before a kill: {slots}")
            t_kill = time.monotonic()
            os.kill(old_pid, signal.SIGKILL)
            t_ready = target.watcher.wait_for(
                lambda s: slot in s and s[slot][0] not in (None, old_pid) and s[slot][1] == target.online_state,
                after=t_kill, timeout=20)
            kills.append({"t_kill": t_kill, "old_pid": old_pid, "t_ready": t_ready,
                          "new_pid": target.watcher.latest()[1].get(slot, (None,))[0]})
        time.sleep(2)
        records = prober.stop()
    finally:
        target.stop()
    for p in target.logs():
        if p.exists():
            shutil.copy(p, out / f"{tag}-{p.name}")
    per_kill = []
    for i, k in enumerate(kills):
        lo = k["t_kill"] - 0.2
        hi = kills[i + 1]["t_kill"] - 0.2 if i + 1 < len(kills) else k["t_kill"] + 2.5
        window = [r for r in records if lo <= r[0] < hi]
        fails = [r for r in window if r[2] != "ok"]
        first_ok_after = next((r for r in sorted(window, key=lambda r: r[1]) if r[0] >= k["t_kill"] and r[2] == "ok"),
                              None)
        done_ok = sorted(r[1] for r in window if r[2] == "ok")
        gaps = [b - a for a, b in zip(done_ok, done_ok[1:])]
        per_kill.append({
            "old_pid": k["old_pid"],
            "new_pid": k["new_pid"],
            "failed": len(fails),
            "failed_by_kind": probe_stats(fails)["failed_by_kind"],
            "serving_again_ms": (first_ok_after[1] - k["t_kill"]) * 1000 if first_ok_after else None,
            "longest_gap_ms": max(gaps) * 1000 if gaps else None,
            "replacement_online_ms": (k["t_ready"] - k["t_kill"]) * 1000 if k["t_ready"] else None,
            "max_probe_latency_ms": max(((r[1] - r[0]) * 1000 for r in window if r[2] == "ok"), default=None),
            "prober_max_lag_ms": max((r[3] for r in window), default=None),
            "t_kill": k["t_kill"],
            "failed_probes_rel_ms": [[round((r[0] - k["t_kill"]) * 1000, 1), round((r[1] - k["t_kill"]) * 1000, 1), r[2]]
                                     for r in fails],
        })
    status_ms = getattr(target.watcher, "call_ms", None)
    result = {
        "command": target.describe(),
        "kills": per_kill,
        "failed": sum(k["failed"] for k in per_kill),
        "probes": len(records),
        "status_sample_ms_median": statistics.median(status_ms) if status_ms else None,
    }
    for key in ("serving_again_ms", "longest_gap_ms", "replacement_online_ms"):
        vals = [k[key] for k in per_kill if k[key] is not None]
        result[key] = {"median": statistics.median(vals) if vals else None, "max": max(vals) if vals else None,
                       "measured": len(vals)}
    log(f"{target.name}: {len(per_kill)} kills, {result['failed']} failed probes, serving again "
        f"median {fmt(result['serving_again_ms']['median'])} ms max {fmt(result['serving_again_ms']['max'])} ms")
    return result


# ---------------------------------------------------------------------------------------------------
# Report


def fmt(v, digits=1):
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def ratio(a, b):
    if a is None or b is None or b == 0:
        return ""
    return f"{a / b:.2f}"


def table(summary):
    names = [n for n in ("cozy", "pm2", "pm2+graceful") if n in summary["reload"] or n in summary["kill1"]]
    head = ["", *names, "cozy / pm2"]
    rows = []

    def add(label, values, show_ratio=False):
        rows.append([label, *[fmt(v) for v in values],
                     ratio(values[0], values[1]) if show_ratio and len(values) > 1 else ""])

    R = summary["reload"]
    if R:
        rows.append([f"**Reload under load** (wrk -t{summary['args']['threads']} -c{summary['args']['connections']} "
                     f"-d{summary['args']['duration']}s, first reload at {summary['args']['reload_at']} s)", *[""] * (len(head) - 1)])
        g = lambda n, f: f(R[n]) if n in R else None
        add("other processes' CPU s during the scenario", [g(n, lambda r: r.get("foreign_cpu_s")) for n in names])
        add("  disturbed (> 5 % of the CPUs)", [g(n, lambda r: "YES" if r.get("disturbed") else "no") for n in names])
        add("requests (wrk)", [g(n, lambda r: r["wrk"]["requests"]) for n in names], True)
        add("requests/s (wrk)", [g(n, lambda r: r["rps"]) for n in names], True)
        add("failed requests (wrk, all kinds)", [g(n, lambda r: r["wrk_failed"]) for n in names])
        for kind in ("connect", "read", "write", "timeout", "non_200"):
            add(f"  of which {kind}", [g(n, lambda r: r["wrk"]["errors"][kind]) for n in names])
        add("latency p50 ms (wrk, whole run)", [g(n, lambda r: r["wrk"]["latency_us"]["p50"] / 1000) for n in names], True)
        add("latency p99 ms (wrk, whole run)", [g(n, lambda r: r["wrk"]["latency_us"]["p99"] / 1000) for n in names], True)
        add("latency max ms (wrk, whole run)", [g(n, lambda r: r["wrk"]["latency_us"]["max"] / 1000) for n in names], True)
        add("reloads (one at a time)", [g(n, lambda r: r["reloads"]) for n in names])
        add("reload command duration ms (longest)", [g(n, lambda r: r["reload_s_max"] * 1000) for n in names], True)
        add("reload command exit codes", [g(n, lambda r: ",".join(map(str, r["reload_exits"]))) for n in names])
        add("every worker replaced", [g(n, lambda r: "yes" if r["all_workers_replaced"] else "NO") for n in names])
        add("prober requests (every 10 ms)", [g(n, lambda r: r["probes_all"]["requests"]) for n in names])
        add("prober failed, whole run", [g(n, lambda r: r["probes_all"]["failed"]) for n in names])
        add("prober's own max lag ms (CPU starvation)", [g(n, lambda r: r["probes_all"]["prober_max_lag_ms"]) for n in names])
        add("prober p50 / p99 / max ms, before reload",
            [g(n, lambda r: "{} / {} / {}".format(*(fmt(r["probes_steady"][k]) for k in ("p50_ms", "p99_ms", "max_ms"))))
             for n in names])
        add("prober requests during reload", [g(n, lambda r: r["probes_during_reload"]["requests"]) for n in names])
        add("prober failed during reload", [g(n, lambda r: r["probes_during_reload"]["failed"]) for n in names])
        add("prober p50 / p99 / max ms, during reload",
            [g(n, lambda r: "{} / {} / {}".format(*(fmt(r["probes_during_reload"][k]) for k in ("p50_ms", "p99_ms", "max_ms"))))
             for n in names])
        add("prober requests, reload start + 2 s", [g(n, lambda r: r["probes_reload_2s"]["requests"]) for n in names])
        add("prober failed, reload start + 2 s", [g(n, lambda r: r["probes_reload_2s"]["failed"]) for n in names])
        add("prober p50 / p99 / max ms, reload start + 2 s",
            [g(n, lambda r: "{} / {} / {}".format(*(fmt(r["probes_reload_2s"][k]) for k in ("p50_ms", "p99_ms", "max_ms"))))
             for n in names])
    for key, label in (("kill1", "1 worker"), ("kill2", "2 workers")):
        K = summary[key]
        if not K:
            continue
        kn = [n for n in names if n in K]
        rows.append([f"**kill -9, {label}** ({summary['args']['kills']} kills, probe every 5 ms)", *[""] * (len(head) - 1)])
        g = lambda n, f: f(K[n]) if n in K else None
        add("other processes' CPU s during the scenario", [g(n, lambda r: r.get("foreign_cpu_s")) for n in names])
        add("  disturbed (> 5 % of the CPUs)", [g(n, lambda r: "YES" if r.get("disturbed") else "no") for n in names])
        add("kills / replacements seen online", [g(n, lambda r: f"{len(r['kills'])} / {r['replacement_online_ms']['measured']}")
                                                  for n in names])
        add("probes sent", [g(n, lambda r: r["probes"]) for n in names])
        add("failed probes (all kills)", [g(n, lambda r: r["failed"]) for n in names])
        add("serving again ms, median / max",
            [g(n, lambda r: f"{fmt(r['serving_again_ms']['median'])} / {fmt(r['serving_again_ms']['max'])}") for n in names])
        add("longest gap without an answer ms, median / max",
            [g(n, lambda r: f"{fmt(r['longest_gap_ms']['median'])} / {fmt(r['longest_gap_ms']['max'])}") for n in names])
        add("prober's own max lag ms (CPU starvation)", [g(n, lambda r: max((k["prober_max_lag_ms"] or 0) for k in r["kills"]))
                                                       for n in names])
        add("replacement reported online ms, median / max",
            [g(n, lambda r: f"{fmt(r['replacement_online_ms']['median'])} / {fmt(r['replacement_online_ms']['max'])}")
             for n in names])
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    lines = ["| " + " | ".join(str(h).ljust(w) for h, w in zip(head, widths)) + " |",
             "| " + " | ".join("-" * w for w in widths) + " |"]
    for r in rows:
        lines.append("| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |")
    return "\n".join(lines)


def machine(cozy_exe):
    def cmd(*c):
        try:
            return subprocess.run(c, capture_output=True, text=True).stdout.strip()
        except OSError:
            return "n/a"
    model = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "os": cmd("sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"),
        "node": cmd("node", "--version"),
        "pm2": json.load(open(HERE / "node_modules" / "pm2" / "package.json"))["version"],
        "wrk": cmd("sh", "-c", "wrk --version 2>&1 | head -1"),
        "git": cmd("git", "-C", str(REPO), "describe", "--always", "--dirty"),
        "cozy_binary_sha256": hashlib.sha256(open(cozy_exe, "rb").read()).hexdigest(),
        "load_before": open("/proc/loadavg").read().strip(),
        "busiest_processes_before": busiest(),
    }


def busiest():
    """The processes using the most CPU right now: whoever else shares the machine during the run."""
    r = subprocess.run(["top", "-b", "-n", "2", "-d", "1", "-w", "200"], capture_output=True, text=True)
    last = r.stdout.split("top - ")[-1].splitlines()  # the second sample: CPU use over the last second
    cpu = [l.strip() for l in last if l.startswith("%Cpu")]
    header = next((i for i, l in enumerate(last) if "PID" in l), len(last))
    return cpu + [l.strip() for l in last[header:header + 6]]


def wait_quiet(minutes):
    """Waits (at most `minutes`) for 10 s in which other processes use less than 5 % of the machine."""
    deadline = time.monotonic() + minutes * 60
    while True:
        probe = ForeignCpu()
        time.sleep(10)
        used, top = probe.stop()
        if used < 0.05 * 10 * os.cpu_count():
            log(f"machine quiet (others used {used:.1f} CPU s in 10 s)")
            return
        if time.monotonic() > deadline:
            log(f"machine still busy after {minutes} min ({top}); measuring anyway")
            return
        log(f"waiting for a quiet machine: others used {used:.1f} CPU s in 10 s {top}")


def main_all(args):
    out = Path(args.results) if args.results else HERE / "results" / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.workdir or f"/tmp/cozy-bench-cluster-{os.getpid()}")
    log(f"results in {out}, scratch in {work}")
    # The target directory is shared: someone's `cargo build --release` may replace the binary mid-run, and
    # a reload re-executes the binary from disk. Measure a private copy.
    work.mkdir(parents=True, exist_ok=True)
    built = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(os.path.getmtime(args.cozy)))
    shutil.copy2(args.cozy, work / "cozy")
    args.cozy = str(work / "cozy")
    only = set(args.only.split(","))
    os.environ[MARK] = str(os.getpid())
    if args.wait_quiet:
        wait_quiet(args.wait_quiet)
    summary = {"args": vars(args), "machine": machine(args.cozy), "reload": {}, "kill1": {}, "kill2": {}}
    summary["machine"]["cozy_binary_built"] = built

    def cozy(name, workers, extra=None):
        return Cozy(args.cozy, work / name, workers, free_port(), args.redis_url, extra)

    # The kill runs shorten COZY_HEALTHY_AFTER_SECS from 30 to 2 so that each of the kills, 3 s apart,
    # is a first crash (restarted at once) rather than a repeated one (restarted after a backoff).
    kill_env = {"COZY_HEALTHY_AFTER_SECS": "2"}
    plans = []
    if "cozy" in only:
        plans += [("reload", lambda: cozy("cozy-reload", 2)),
                  ("kill1", lambda: cozy("cozy-kill1", 1, kill_env)),
                  ("kill2", lambda: cozy("cozy-kill2", 2, kill_env))]
    if "pm2" in only:
        plans += [("reload", lambda: Pm2(work / "pm2-reload", 2, free_port(), False)),
                  ("kill1", lambda: Pm2(work / "pm2-kill1", 1, free_port(), False)),
                  ("kill2", lambda: Pm2(work / "pm2-kill2", 2, free_port(), False))]
    if "pm2+graceful" in only:
        plans += [("reload", lambda: Pm2(work / "pm2g-reload", 2, free_port(), True, args.pm2_graceful_kill_timeout))]
    plans = [(scenario, make) for scenario, make in plans if scenario in args.scenarios.split(",")]
    for scenario, make in plans:
        for attempt in range(1, args.retry_disturbed + 2):
            if args.wait_quiet and attempt > 1:
                wait_quiet(args.wait_quiet)
            target = make()
            summary.setdefault("machine_before_scenario", {})[f"{target.name}-{scenario}"] = busiest()
            foreign = ForeignCpu()
            t0 = time.monotonic()
            if scenario == "reload":
                result = reload_scenario(args, target, out)
            else:
                result = kill_scenario(args, target, out)
            summary[scenario][target.name] = result
            result["foreign_cpu_s"], result["foreign_cpu_top"] = foreign.stop()
            result["scenario_s"] = time.monotonic() - t0
            result["attempt"] = attempt
            # 5 % of the machine: more than that and the figures say more about the neighbours than the target.
            result["disturbed"] = result["foreign_cpu_s"] > 0.05 * result["scenario_s"] * os.cpu_count()
            if not result["disturbed"]:
                break
            log(f"{target.name} {scenario}: other processes used {result['foreign_cpu_s']:.1f} s of CPU during "
                f"these {result['scenario_s']:.0f} s ({result['foreign_cpu_top']}): the figures are disturbed")
        with open(out / "summary.json", "w") as f:  # so far: an interrupted run keeps what it measured
            json.dump(summary, f, indent=1)
    summary["machine"]["load_after"] = open("/proc/loadavg").read().strip()
    summary["machine"]["busiest_processes_after"] = busiest()
    with open(out / "summary.json", "w") as f:
        json.dump(summary, f, indent=1)
    text = table(summary)
    with open(out / "summary.txt", "w") as f:
        f.write(text + "\n")
    print(text)
    print(f"\nraw outputs: {out}")
    if not args.keep_workdir:
        shutil.rmtree(work, ignore_errors=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("all", help="run every scenario and print the table")
    a.add_argument("--cozy", default=str(REPO / "target" / "release" / "cozy"))
    a.add_argument("--redis-url", default="redis://127.0.0.1:6379")
    a.add_argument("--duration", type=int, default=30, help="wrk seconds for the reload scenario")
    a.add_argument("--reload-at", type=float, default=5, help="seconds into the load when the reload starts")
    a.add_argument("--reloads", type=int, default=3, help="reloads per load run, one after the other")
    a.add_argument("--reload-gap", type=float, default=3, help="seconds between the end of a reload and the next")
    a.add_argument("--threads", type=int, default=2)
    a.add_argument("--connections", type=int, default=32)
    a.add_argument("--kills", type=int, default=5)
    a.add_argument("--pm2-graceful-kill-timeout", type=int, default=None,
                   help="--kill-timeout (ms) for the pm2+graceful run (default: PM2's own, 1600)")
    a.add_argument("--only", default="cozy,pm2,pm2+graceful")
    a.add_argument("--scenarios", default="reload,kill1,kill2")
    a.add_argument("--wait-quiet", type=float, default=0, metavar="MINUTES",
                   help="first wait up to this long for 10 s in which other processes use < 5 %% of the CPUs")
    a.add_argument("--retry-disturbed", type=int, default=0, metavar="N",
                   help="run a scenario again (up to N times, after --wait-quiet) when other processes used more "
                        "than 5 %% of the CPUs during it")
    a.add_argument("--results", default=None)
    a.add_argument("--workdir", default=None)
    a.add_argument("--keep-workdir", action="store_true")
    pr = sub.add_parser("probe", help="(internal) the prober process")
    pr.add_argument("--port", type=int, required=True)
    pr.add_argument("--interval-ms", type=float, required=True)
    pr.add_argument("--timeout-s", type=float, default=5.0)
    pr.add_argument("--out", required=True)
    args = p.parse_args()
    if args.cmd == "probe":
        asyncio.run(probe_main(args.port, args.interval_ms / 1000, args.timeout_s, args.out))
    else:
        main_all(args)


if __name__ == "__main__":
    main()
