"""GET /status speed, the daemon's memory and start time, against baselines from the same run.

    python3 bench/bench_status.py [--seconds 10] [--clients 32] [--samples 300]

1. Latency, one client: GET /status (fresh connection, and one keep-alive connection) alternated
   in one loop with the bare `systemctl show ai-hub.service -p ...` the status is made of. The
   bare call is timed inside the sandbox by a long-lived helper process (no nsenter per call).
   Target: p50(status) <= 1.2x p50(bare).
2. Throughput: --clients threads, each on its own keep-alive connection, for --seconds, against
   the bare systemctl rate inside the sandbox (1 and --clients runners; the higher one counts).
   Target: >= 5x, with zero errors.
3. Idle memory of the daemon (VmRSS, VmHWM) against a floor: python3 that imported http.server.
4. Start: from `systemctl start ai-hub-manager.service` to the first 200 from GET /status, and
   how long `systemctl start` took to return (with Type=notify, only after READY=1), against the
   floor: `python3 -c 'import http.server'` run to completion. Medians of 5.

Everything runs in a throwaway systemd (tests/sandbox.py) and talks only to 127.0.0.1.
Prints figures; asserts nothing (these machines are noisy)."""

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

import sandbox as sandbox_mod  # noqa: E402
from support import Host, Lab  # noqa: E402

SHOW = ["systemctl", "show", Host.SERVICE, "-p", "LoadState,ActiveState,SubState,MainPID,"
        "ActiveEnterTimestamp,NRestarts,Result,Description,UnitFileState"]
FLOOR_IMPORT = ["/usr/bin/python3", "-c", "import http.server"]
FLOOR_IDLE = ["/usr/bin/python3", "-c", "import http.server, os, time; "
              "print('ready', os.getpid(), flush=True); time.sleep(60)"]

# Runs inside the sandbox. One JSON job a line: {"argv": [...]} runs it once and answers its
# start and end (CLOCK_MONOTONIC, the same clock as time.monotonic() outside: it is not
# namespaced); {"argv": [...], "seconds": S, "threads": N} runs it in N loops for S seconds.
# The environment is the one the manager gives its own commands.
HELPER = r'''
import json, subprocess, sys, threading, time
ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8",
       "TZ": "UTC", "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": "cat", "PAGER": "cat", "SYSTEMD_LESS": ""}
def once(argv):
    start = time.monotonic()
    rc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE, env=ENV).returncode
    return {"start": start, "end": time.monotonic(), "rc": rc}
def loop(argv, deadline, counts):
    while time.monotonic() < deadline:
        counts.append(once(argv)["rc"] == 0)  # list.append is atomic
for line in sys.stdin:
    job = json.loads(line)
    if "seconds" not in job:
        print(json.dumps(once(job["argv"])), flush=True)
        continue
    counts, begun = [], time.monotonic()
    threads = [threading.Thread(target=loop, args=(job["argv"], begun + job["seconds"], counts))
               for _ in range(job["threads"])]
    for t in threads: t.start()
    for t in threads: t.join()
    print(json.dumps({"ok": sum(counts), "errors": counts.count(False),
                      "elapsed": time.monotonic() - begun}), flush=True)
'''


class Helper:
    """The helper above, started once inside the sandbox; ask() sends one job, returns the answer."""

    def __init__(self, sb):
        self.proc = sb.popen(["/usr/bin/python3", "-u", "-c", HELPER], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, universal_newlines=True, bufsize=1)

    def ask(self, **job):
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the helper inside the sandbox exited")
        return json.loads(line)


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


def ms(x):
    return f"{x * 1000:.2f} ms"


def mb(kb):
    return f"{kb / 1024:.1f} MB"


def connect(port, timeout=30):  # one fresh connection to the manager
    return http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)


def get_status(conn):
    conn.request("GET", "/status")
    response = conn.getresponse()
    response.read()
    return response.status


def memory_kb(sb, pid):
    text = sb.run(["cat", f"/proc/{pid}/status"]).stdout
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def hammer(port, clients, seconds):
    """`clients` threads, each on its own keep-alive connection; returns (ok, errors, elapsed)."""
    results, deadline = [], time.monotonic() + seconds

    def loop():
        conn = connect(port)
        while time.monotonic() < deadline:
            try:
                if get_status(conn) == 200:
                    results.append(True)
                    continue
            except (OSError, http.client.HTTPException):
                pass
            results.append(False)  # a non-200 or a failure: count it, reconnect
            conn.close()
            conn = connect(port)
        conn.close()

    threads = [threading.Thread(target=loop) for _ in range(clients)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(results), results.count(False), time.monotonic() - started


def timed_start(sb, host, helper):
    """(seconds until `systemctl start` returned, seconds until the first 200 from /status),
    both from the moment the helper ran systemctl start; a poller runs meanwhile."""
    sb.systemctl("stop", host.MANAGER_UNIT)
    first, done = [], threading.Event()

    def poll():
        while not done.is_set() and not first:
            conn = connect(host.port, timeout=10)
            try:
                if get_status(conn) == 200:
                    first.append(time.monotonic())
            except (OSError, http.client.HTTPException):
                time.sleep(0.001)
            finally:
                conn.close()

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        result = helper.ask(argv=["systemctl", "start", host.MANAGER_UNIT])
        poller.join(20)
    finally:
        done.set()
        poller.join()
    if result["rc"] != 0 or not first:
        raise RuntimeError(f"manager did not start: {result}\n"
                           f"{sb.systemctl('status', host.MANAGER_UNIT).stdout}")
    return result["end"] - result["start"], first[0] - result["start"]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--python", default="/usr/bin/python3")
    args = parser.parse_args()
    reason = sandbox_mod.unavailable_reason()
    if reason:
        sys.exit(f"bench: {reason}")
    with Lab("bench-status") as lab:
        run(lab, args)


def run(lab, args):
    sb = lab.sandbox
    helper = floor = None
    try:
        host = lab.host(python=args.python, settle=0)
        host.install_base("4.0.0")
        host.start()
        helper = Helper(sb)
        kind = sb.systemctl("show", host.MANAGER_UNIT, "-p", "Type").stdout.strip()
        print(f"manager {host.MANAGER_UNIT} {kind}, on 127.0.0.1:{host.port}", flush=True)

        # 3, first: an idle manager that has served a few requests and nothing else
        for _ in range(20):
            host.api("GET", "/status")
        time.sleep(1)
        idle = memory_kb(sb, host.manager_pid())
        floor = sb.popen(FLOOR_IDLE, stdout=subprocess.PIPE, universal_newlines=True)
        floor_pid = floor.stdout.readline().split()[1]
        floor_mem = memory_kb(sb, floor_pid)
        sb.run(["kill", floor_pid])
        floor.wait(10)

        print(f"1. latency: {args.samples} samples of each, alternated ...", flush=True)
        fresh, kept, bare = [], [], []
        keep = connect(host.port)
        for _ in range(args.samples):
            conn = connect(host.port)
            t = time.monotonic()
            codes = [get_status(conn)]
            fresh.append(time.monotonic() - t)
            conn.close()
            t = time.monotonic()
            codes.append(get_status(keep))
            kept.append(time.monotonic() - t)
            result = helper.ask(argv=SHOW)
            bare.append(result["end"] - result["start"])
            if codes + [result["rc"]] != [200, 200, 0]:
                raise RuntimeError(f"GET /status {codes}, systemctl show rc {result['rc']}")
        keep.close()
        for name, xs in (("GET /status, fresh connection", fresh),
                         ("GET /status, keep-alive", kept), ("bare systemctl show", bare)):
            print(f"   {name:30} p50 {ms(pct(xs, 50))}   p99 {ms(pct(xs, 99))}")

        print(f"2. throughput: {args.clients} clients for {args.seconds:g} s ...", flush=True)
        ok, errors, elapsed = hammer(host.port, args.clients, args.seconds)
        rate = ok / elapsed
        print(f"   GET /status: {ok} ok, {errors} errors, {rate:.0f} req/s")
        bare_rates = {}
        for runners in sorted({1, args.clients}):
            r = helper.ask(argv=SHOW, seconds=args.seconds, threads=runners)
            bare_rates[runners] = r["ok"] / r["elapsed"]
            print(f"   bare systemctl show, {runners} runner(s): {r['ok']} ok, {r['errors']} "
                  f"errors, {bare_rates[runners]:.0f} calls/s")
        best = max(bare_rates, key=bare_rates.get)
        time.sleep(1)
        loaded = memory_kb(sb, host.manager_pid())

        print("4. start: 5 times stop, then start the manager; 5 runs of the floor ...", flush=True)
        starts, imports = [], []
        for i in range(5):
            starts.append(timed_start(sb, host, helper))
            r = helper.ask(argv=FLOOR_IMPORT)
            imports.append(r["end"] - r["start"])
            print(f"   systemctl start returned {ms(starts[-1][0])}, first 200 "
                  f"{ms(starts[-1][1])}; python3 -c 'import http.server' {ms(imports[-1])}")
        returned, answered = (statistics.median(xs) for xs in zip(*starts))
        floor_start = statistics.median(imports)

        b50, f50, k50 = pct(bare, 50), pct(fresh, 50), pct(kept, 50)
        print("\nreport:")
        print(f"  1. latency p50: GET /status {ms(f50)} (keep-alive {ms(k50)}), bare systemctl "
              f"show {ms(b50)}: {f50 / b50:.2f}x (keep-alive {k50 / b50:.2f}x)  (target <= 1.2x)")
        print(f"  2. throughput: GET /status {rate:.0f} req/s, {errors} errors; bare "
              f"{bare_rates[best]:.0f} calls/s ({best} runners): {rate / bare_rates[best]:.1f}x"
              f"  (target >= 5x, zero errors)")
        print(f"  3. idle memory: manager RSS {mb(idle[0])}, HWM {mb(idle[1])}; floor (python3 + "
              f"http.server) RSS {mb(floor_mem[0])}: {mb(idle[0] - floor_mem[0])} above; after "
              f"the load RSS {mb(loaded[0])}, HWM {mb(loaded[1])}")
        print(f"  4. start ({kind}), medians of 5: first 200 after {ms(answered)}, systemctl "
              f"start returned after {ms(returned)}; floor python3 -c 'import http.server' "
              f"{ms(floor_start)}: {answered / floor_start:.2f}x")
    finally:
        for proc in (floor, helper and helper.proc):
            if proc and proc.poll() is None:
                proc.kill()  # nsenter; what it started inside goes with the sandbox
                proc.wait()


if __name__ == "__main__":
    main()
