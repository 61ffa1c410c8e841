"""GET /status speed, the daemon's memory and start time, against baselines from the same run.

    python3 bench/bench_status.py [--seconds 10] [--clients 32] [--samples 300] [--no-supervisor]
                                  [--poll-seconds 60]

1. Latency, one client: GET /status (fresh connection, and one keep-alive connection) alternated
   in one loop with the bare `systemctl show ai-hub.service -p ...` the status is made of. The
   bare call is timed inside the sandbox by a long-lived helper process (no nsenter per call).
   Target: p50(status) <= 1.2x p50(bare).
2. Throughput: --clients threads, each on its own keep-alive connection, for --seconds, against
   the bare systemctl rate inside the sandbox (1 and --clients runners; the higher one counts).
   Target: >= 5x, with zero errors.
3. Idle memory of the daemon (VmRSS, VmHWM) against a floor: python3 that imported http.server.
   Target: RSS <= 22.5 MB on Debian's /usr/bin/python3.
4. Start: from `systemctl start ai-hub-manager.service` to the first 200 from GET /status, and
   how long `systemctl start` took to return (with Type=notify, only after READY=1), against the
   floor: `python3 -c 'import http.server'` run to completion. Medians of 5.
5. Against Supervisor 4.3 in the same run (skipped with --no-supervisor): pip installs it into a
   venv in the lab folder (made by the manager's --python), and `supervisord -n` runs inside the
   sandbox like the manager (same namespaces, the host's network; a plain child process, without
   the manager unit's hardening) with one program (`sleep`) and its XML-RPC interface on
   127.0.0.1. One client code (raw sockets, request bytes built once, an answer counts only if
   it is a 200 with the expected content) asks both: GET /status of the manager and
   supervisor.getProcessInfo(name) (POST /RPC2) of supervisord. p50 and p90 latency with one
   client (fresh connection per request, and one keep-alive connection; the two servers
   alternated request by request), then the rate with 1 and --clients threads, fresh connections
   and keep-alive connections, --seconds per run, manager and supervisord runs alternated.
   Errors are counted by kind, and the servers' CPU time per answer is read from /proc. Idle RSS
   of both, measured side by side before the runs (the manager as restarted by 4.).
   Targets: rate with --clients clients on fresh connections >= 1.2x supervisord's, with zero
   errors; p50 with one client <= 0.9x supervisord's.
6. The journal: GET /status 10 times a second for --poll-seconds (60), on fresh connections, as
   a hub polling an agent; the lines the manager wrote meanwhile. Target: none.

Everything runs in a throwaway systemd (tests/sandbox.py) and talks only to 127.0.0.1 (and,
for part 5, pip to its package index; the venv goes with the lab folder). Prints figures;
asserts nothing (these machines are noisy)."""

import argparse
import collections
import http.client
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
import xmlrpc.client

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

import sandbox as sandbox_mod  # noqa: E402
from support import Host, Lab, free_port  # noqa: E402

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
    if not xs:
        return float("nan")
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


def journal_lines(sb, host):
    """Lines the manager unit has in the journal. (A count of the whole, not --after-cursor:
    journalctl 252 with -u skips entries after a cursor that share its timestamp.)"""
    out = sb.run(["journalctl", "-u", host.MANAGER_UNIT, "-o", "cat", "--no-pager"]).stdout
    return len(out.splitlines())


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


# --- 5. against Supervisor -------------------------------------------------------------------------

SUPERVISOR = "supervisor==4.3.*"
PROGRAM = "sleeper"  # supervisord's one program
SUPERVISOR_CONF = """[supervisord]
logfile={folder}/supervisord.log
pidfile={folder}/supervisord.pid
childlogdir={folder}
user=root

[inet_http_server]
port=127.0.0.1:{port}

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[program:{program}]
command=/bin/sleep 100000
stdout_logfile=NONE
stderr_logfile=NONE
"""


def install_supervisor(python, venv):
    """A venv made by `python` holding Supervisor 4.3; returns supervisord's --version."""
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_ROOT_USER_ACTION="ignore",
               PIP_NO_CACHE_DIR="1")  # nothing left outside the lab folder
    for argv in ([python, "-m", "venv", venv],
                 [os.path.join(venv, "bin", "pip"), "install", "-q", SUPERVISOR]):
        r = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, universal_newlines=True, env=env, timeout=600)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed (rc {r.returncode}); --no-supervisor "
                               f"skips part 5:\n{r.stdout}")
    return subprocess.run([os.path.join(venv, "bin", "supervisord"), "--version"], check=True,
                          stdout=subprocess.PIPE, universal_newlines=True).stdout.strip()


class Target:
    """One server to ask: the request's bytes, built once, and what a good answer contains."""

    def __init__(self, name, port, request, expect, pid):
        self.name, self.port, self.request = name, port, request
        self.expect = re.compile(expect)
        self.pid = pid  # () -> its PID inside the sandbox


def manager_target(host):
    request = f"GET /status HTTP/1.1\r\nHost: 127.0.0.1:{host.port}\r\n\r\n".encode()
    return Target("manager", host.port, request, rb'"running":\s*true', host.manager_pid)


def supervisor_target(port, pid):
    body = xmlrpc.client.dumps((PROGRAM,), "supervisor.getProcessInfo").encode()
    request = (f"POST /RPC2 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: text/xml\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    return Target("supervisord", port, request,
                  rb"<name>statename</name>\s*<value><string>RUNNING</string>", pid)


def open_connection(target):
    sock = socket.create_connection(("127.0.0.1", target.port), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def exchange(sock, target):
    """Send target's request on sock and read one answer (Content-Length framed).
    Returns (status, body, whether the connection can carry another request)."""
    sock.sendall(target.request)
    data = b""
    end = -1
    while end < 0:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed before the end of the answer's head")
        data += chunk
        end = data.find(b"\r\n\r\n")
    head = data[:end].split(b"\r\n")
    version, status = head[0].split()[:2]
    fields = {}
    for line in head[1:]:
        name, _, value = line.partition(b":")
        fields[name.strip().lower()] = value.strip().lower()
    length = int(fields[b"content-length"])  # none: a KeyError, counted as an error
    body = data[end + 4:]
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed before the end of the answer's body")
        body += chunk
    connection = fields.get(b"connection")
    reusable = len(body) == length and connection != b"close" and (
        version == b"HTTP/1.1" or connection == b"keep-alive")
    return status, body, reusable


ERRORS = (OSError, ValueError, KeyError, IndexError)


def fault(target, status, body):
    """None for a good answer (200 with the expected content), else what was wrong."""
    if status == b"200" and target.expect.search(body):
        return None
    return f"{status.decode(errors='replace')} {body[:100].decode(errors='replace')!r}"


def ask_fresh(target):
    """One request on a fresh connection: (None or what went wrong, seconds it took)."""
    started = time.monotonic()
    try:
        sock = open_connection(target)
        try:
            status, body, _ = exchange(sock, target)
        finally:
            sock.close()
        return fault(target, status, body), time.monotonic() - started
    except ERRORS as e:
        return type(e).__name__, time.monotonic() - started


class Kept:
    """One keep-alive connection; reopened (untimed, counted) when the server closes it."""

    def __init__(self, target):
        self.target, self.sock, self.reconnects = target, None, 0

    def ask(self):
        """(None or what went wrong, seconds it took)."""
        try:
            if self.sock is None:
                self.sock = open_connection(self.target)
        except ERRORS as e:
            return f"reconnecting: {type(e).__name__}", 0.0
        started = time.monotonic()
        try:
            status, body, reusable = exchange(self.sock, self.target)
            why = fault(self.target, status, body)
        except ERRORS as e:
            why, reusable = type(e).__name__, False
        took = time.monotonic() - started
        if not reusable:
            self.close()
            self.reconnects += 1
        return why, took

    def close(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def latencies(targets, samples):
    """{(name, mode): [seconds of each good answer]}, {(name, mode): errors}, {name: keep-alive
    reconnects}: per sample, each target once fresh and once on its keep-alive connection,
    the targets' order swapped from one sample to the next."""
    times = {(t.name, mode): [] for t in targets for mode in ("fresh", "keep-alive")}
    errors = dict.fromkeys(times, 0)
    kept = {t.name: Kept(t) for t in targets}
    try:
        for i in range(samples):
            for target in (targets if i % 2 == 0 else targets[::-1]):
                for mode, ask in (("fresh", lambda: ask_fresh(target)),
                                  ("keep-alive", kept[target.name].ask)):
                    why, took = ask()
                    if why is None:
                        times[target.name, mode].append(took)
                    else:
                        errors[target.name, mode] += 1
                        if errors[target.name, mode] <= 5:  # the first few
                            print(f"   {target.name}, {mode}: error: {why}", flush=True)
    finally:
        for k in kept.values():
            k.close()
    return times, errors, {name: k.reconnects for name, k in kept.items()}


def cpu_seconds(sb, pid):
    """utime + stime + cutime + cstime (reaped children included: the manager's systemctl)."""
    stat = sb.run(["cat", f"/proc/{pid}/stat"]).stdout
    return sum(int(x) for x in stat.rsplit(")", 1)[1].split()[11:15]) / os.sysconf("SC_CLK_TCK")


def rate(sb, target, clients, seconds, keep_alive):
    """`clients` threads asking `target` for `seconds`, on a fresh connection per request or
    each on its own keep-alive connection. Returns a dict: ok, errors, why (errors by kind),
    reconnects, elapsed, rate, cpu (the server's CPU seconds per good answer)."""
    results, barrier, deadline = [], threading.Barrier(clients + 1), []

    def loop():
        ok, why = 0, collections.Counter()
        kept = Kept(target) if keep_alive else None
        barrier.wait()
        try:
            while time.monotonic() < deadline[0]:
                wrong = kept.ask()[0] if kept else ask_fresh(target)[0]
                if wrong is None:
                    ok += 1
                else:
                    why[wrong] += 1
        finally:
            if kept:
                kept.close()
            results.append((ok, why, kept.reconnects if kept else 0))

    pid = target.pid()
    cpu_before = cpu_seconds(sb, pid)
    threads = [threading.Thread(target=loop) for _ in range(clients)]
    for t in threads:
        t.start()
    started = time.monotonic()
    deadline.append(started + seconds)
    barrier.wait()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    cpu = cpu_seconds(sb, pid) - cpu_before
    ok, reconnects = sum(r[0] for r in results), sum(r[2] for r in results)
    why = sum((r[1] for r in results), collections.Counter())
    return {"ok": ok, "errors": sum(why.values()), "why": why, "reconnects": reconnects,
            "elapsed": elapsed,
            "rate": ok / elapsed, "cpu": cpu / ok if ok else float("nan")}


class Supervisord:
    """`supervisord -n` inside the sandbox, a child of this process (through nsenter), with
    its config, pid file and logs in `folder`; stop() always ends it."""

    def __init__(self, sb, venv, folder):
        self.sb, self.folder, self.port = sb, folder, free_port()
        os.makedirs(folder)
        conf = os.path.join(folder, "supervisord.conf")
        with open(conf, "w") as f:
            f.write(SUPERVISOR_CONF.format(folder=folder, port=self.port, program=PROGRAM))
        self.output = os.path.join(folder, "supervisord.out")
        with open(self.output, "wb") as out:
            self.proc = sb.popen([os.path.join(venv, "bin", "supervisord"), "-n", "-c", conf],
                                 stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        self.target = supervisor_target(self.port, self.pid)

    def pid(self):
        with open(os.path.join(self.folder, "supervisord.pid")) as f:
            return int(f.read().strip())  # inside the sandbox

    def wait_running(self, timeout=30):
        """Until getProcessInfo says the program is RUNNING (after startsecs=1)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            if ask_fresh(self.target)[0] is None:
                return
            time.sleep(0.1)
        with open(self.output, errors="replace") as f:
            tail = "".join(f.readlines()[-20:])
        raise RuntimeError(f"supervisord did not answer on 127.0.0.1:{self.port} with "
                           f"{PROGRAM} RUNNING (exit code {self.proc.poll()}):\n{tail}")

    def stop(self):
        if self.proc.poll() is not None:
            return
        try:
            pid = self.pid()
        except (OSError, ValueError):
            pid = None
        if pid:
            self.sb.run(["kill", "-TERM", str(pid)])  # it stops its program, then exits
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            if pid:
                self.sb.run(["kill", "-KILL", str(pid)])
            self.proc.kill()  # nsenter; a leftover inside goes with the sandbox
            self.proc.wait()


def compare(sb, host, sup, samples, clients, seconds):
    """Part 5: both servers asked by the same client code; returns the figures."""
    targets = [manager_target(host), sup.target]
    for target in targets:  # one full check of each answer, parsed, before the figures
        sock = open_connection(target)
        try:
            status, body, _ = exchange(sock, target)
        finally:
            sock.close()
        if fault(target, status, body):
            raise RuntimeError(f"{target.name}: unexpected answer {status!r} {body[:300]!r}")
        if target is sup.target:
            xmlrpc.client.loads(body)
        else:
            json.loads(body)
    print(f"5a. latency, one client: {samples} samples of each, alternated ...", flush=True)
    times, errors, reconnects = latencies(targets, samples)
    runs = {}
    for i, (n, keep_alive) in enumerate([(1, False), (clients, False), (1, True),
                                         (clients, True)]):
        mode = "keep-alive" if keep_alive else "fresh"
        print(f"5b. rate, {n} client(s), {mode} connections, {seconds:g} s each ...", flush=True)
        for target in (targets if i % 2 == 0 else targets[::-1]):
            time.sleep(0.5)  # the previous run's sockets and threads wind down
            r = runs[target.name, n, mode] = rate(sb, target, n, seconds, keep_alive)
            print(f"   {target.name:12} {r['ok']} ok, {r['errors']} errors, "
                  f"{r['reconnects']} reconnects, {r['rate']:.0f} req/s, server CPU "
                  f"{r['cpu'] * 1000:.3f} ms/answer", flush=True)
            if r["why"]:
                for kind, n in r["why"].most_common(3):
                    print(f"      {n} errors: {kind}", flush=True)
    return times, errors, reconnects, runs


def div(a, b):
    return a / b if b else float("nan")


def report_comparison(version, times, errors, reconnects, runs, clients, memory):
    """The side-by-side table, the ratios (manager/supervisord) and the targets."""
    m, s = "manager", "supervisord"
    rows = []
    for mode in ("fresh", "keep-alive"):
        for p in (50, 90):
            a, b = pct(times[m, mode], p), pct(times[s, mode], p)
            rows.append((f"p{p} latency, 1 client, {mode}", f"{ms(a)} ({errors[m, mode]} err)",
                         f"{ms(b)} ({errors[s, mode]} err)", div(a, b)))
    for mode in ("fresh", "keep-alive"):
        for n in sorted({1, clients}):
            a, b = runs[m, n, mode], runs[s, n, mode]
            rows.append((f"rate, {n} client{'s' * (n > 1)}, {mode}", f"{a['rate']:.0f}/s ({a['errors']} err)",
                         f"{b['rate']:.0f}/s ({b['errors']} err)", div(a["rate"], b["rate"])))
    for mode in ("fresh", "keep-alive"):
        n = clients
        a, b = runs[m, n, mode]["cpu"], runs[s, n, mode]["cpu"]
        rows.append((f"server CPU/answer, {n} clients, {mode}", ms(a), ms(b), div(a, b)))
    rows.append(("idle RSS (HWM)", f"{mb(memory[m][0])} ({mb(memory[m][1])})",
                 f"{mb(memory[s][0])} ({mb(memory[s][1])})", div(memory[m][0], memory[s][0])))
    print(f"  5. manager GET /status against Supervisor {version} getProcessInfo('{PROGRAM}'), "
          f"same client (ratio = manager/supervisord):")
    width = max(len(row[0]) for row in rows)
    print(f"     {'':{width}} {'manager':>20} {'supervisord':>20} {'ratio':>6}")
    for name, a, b, ratio in rows:
        print(f"     {name:{width}} {a:>20} {b:>20} {ratio:6.2f}")
    kept_reconnects = {name: reconnects[name] + sum(
        runs[name, n, "keep-alive"]["reconnects"] for n in {1, clients}) for name in (m, s)}
    print("     server CPU: user+sys of the server process and its reaped children, per good "
          "answer; idle RSS: after 20 requests and 1 s of rest")
    print(f"     keep-alive connections the server closed: manager {kept_reconnects[m]}, "
          f"supervisord {kept_reconnects[s]}")
    fresh = runs[m, clients, "fresh"], runs[s, clients, "fresh"]
    ratio = div(fresh[0]["rate"], fresh[1]["rate"])
    met = ratio >= 1.2 and fresh[0]["errors"] == 0
    print(f"     target: rate, {clients} clients, fresh connections >= 1.2x supervisord with 0 "
          f"errors: {ratio:.2f}x, {fresh[0]['errors']} errors: {'met' if met else 'NOT met'}")
    for mode in ("fresh", "keep-alive"):
        ratio = div(pct(times[m, mode], 50), pct(times[s, mode], 50))
        print(f"     target: p50, 1 client, {mode} <= 0.9x supervisord: {ratio:.2f}x: "
              f"{'met' if ratio <= 0.9 else 'NOT met'}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--python", default="/usr/bin/python3")
    parser.add_argument("--no-supervisor", action="store_true",
                        help="skip part 5, the comparison with Supervisor 4.3 (pip install)")
    parser.add_argument("--poll-seconds", type=float, default=60,
                        help="part 6: how long to poll GET /status 10 times a second")
    args = parser.parse_args()
    reason = sandbox_mod.unavailable_reason()
    if reason:
        sys.exit(f"bench: {reason}")
    with Lab("bench-status") as lab:
        run(lab, args)


def run(lab, args):
    sb = lab.sandbox
    helper = floor = sup = None
    try:
        if not args.no_supervisor:  # first: a failed install ends the run before the figures
            print(f"5, first: pip install {SUPERVISOR} into a venv in the lab folder ...",
                  flush=True)
            venv = os.path.join(lab.work, "supervisor", "venv")
            version = install_supervisor(args.python, venv)
            print(f"   {version}", flush=True)
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

        if not args.no_supervisor:
            sup = Supervisord(sb, venv, os.path.join(lab.work, "supervisor", "run"))
            sup.wait_running()
            print(f"5. against Supervisor {version}: supervisord -n in the sandbox on "
                  f"127.0.0.1:{sup.port}, manager on 127.0.0.1:{host.port}", flush=True)
            # Idle memory of both, as in 3.: 20 requests each (same client), then 1 s of rest
            manager = manager_target(host)
            for _ in range(20):
                ask_fresh(manager)
                ask_fresh(sup.target)
            time.sleep(1)
            memory = {"manager": memory_kb(sb, host.manager_pid()),
                      "supervisord": memory_kb(sb, sup.pid())}
            comparison = compare(sb, host, sup, args.samples, args.clients, args.seconds)
            sup.stop()

        print(f"6. journal: GET /status 10 times a second for {args.poll_seconds:g} s, as a "
              "hub polling this agent ...", flush=True)
        before = journal_lines(sb, host)
        polls, next_at = 0, time.monotonic()
        deadline = next_at + args.poll_seconds
        while next_at < deadline:
            time.sleep(max(0.0, next_at - time.monotonic()))
            conn = connect(host.port)
            if get_status(conn) != 200:
                raise RuntimeError("GET /status failed while polling")
            conn.close()
            polls += 1
            next_at += 0.1
        time.sleep(1)  # journald may need a moment
        added = journal_lines(sb, host) - before
        print(f"   {polls} polls, {added} journal lines added")

        b50, f50, k50 = pct(bare, 50), pct(fresh, 50), pct(kept, 50)
        print("\nreport:")
        print(f"  1. latency p50: GET /status {ms(f50)} (keep-alive {ms(k50)}), bare systemctl "
              f"show {ms(b50)}: {f50 / b50:.2f}x (keep-alive {k50 / b50:.2f}x)  (target <= 1.2x)")
        print(f"  2. throughput: GET /status {rate:.0f} req/s, {errors} errors; bare "
              f"{bare_rates[best]:.0f} calls/s ({best} runners): {rate / bare_rates[best]:.1f}x"
              f"  (target >= 5x, zero errors)")
        print(f"  3. idle memory: manager RSS {mb(idle[0])} (target <= 22.5 MB), HWM "
              f"{mb(idle[1])}; floor (python3 + http.server) RSS {mb(floor_mem[0])}: "
              f"{mb(idle[0] - floor_mem[0])} above; after the load RSS {mb(loaded[0])}, HWM "
              f"{mb(loaded[1])}")
        print(f"  4. start ({kind}), medians of 5: first 200 after {ms(answered)}, systemctl "
              f"start returned after {ms(returned)}; floor python3 -c 'import http.server' "
              f"{ms(floor_start)}: {answered / floor_start:.2f}x")
        if not args.no_supervisor:
            report_comparison(version, *comparison, args.clients, memory)
        print(f"  6. journal: {added} lines from the manager while it answered {polls} GET "
              f"/status polls in {args.poll_seconds:g} s  (target 0)")
    finally:
        if sup:
            sup.stop()
        for proc in (floor, helper and helper.proc):
            if proc and proc.poll() is None:
                proc.kill()  # nsenter; what it started inside goes with the sandbox
                proc.wait()


if __name__ == "__main__":
    main()
