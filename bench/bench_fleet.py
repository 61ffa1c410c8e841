"""Fleet figures, measured in one run against baselines from the same run.

    python3 bench/bench_fleet.py [--agents 200] [--dead 20] [--rollout-agents 50] [--parallel 10]

1. GET /agents over --agents real agent managers (each a transient unit in a throwaway systemd,
   on port 3081 at its own loopback address 127.5.x.y, all controlling one small shared
   service): the time with all up (target under 1 s), then with --dead of them dead, half
   refusing connections and half accepting but never answering (target at most the 5 s
   deadline + 0.5 s); and the hub manager's peak memory growth (VmHWM) over it all (target at
   most 5 MB).
2. A rollout to --rollout-agents agents (127.6.0.y, each with its own service and a small
   release), --rollout-batches 100% --rollout-parallel N, --settle 0, done twice by the hub and
   twice by a baseline driver (this bench's own threads, N at once, no hub), alternately. The
   hub's time (from its record) against three references from the same run:
   - the baseline driver: what the hub adds over a plain scheduler on the same machine, in the
     same run. Target: at most 1.1x;
   - for information, the waves times the median time of one agent's update alone (measured on
     one more agent): on one machine the agents share its CPUs, so the CPU floor below is
     printed beside it;
   - the waves times each agent's own update during the rollout.
   It also prints the CPU figures that bound any scheduler here: the machine's CPU time of one
   update alone, times the agents, over the CPUs. Every agent is checked to run the new version.

Talks only to 127.0.0.0/8. Prints figures; asserts nothing (these machines are noisy)."""

import argparse
import json
import math
import os
import queue
import socket
import statistics
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

import sandbox as sandbox_mod  # noqa: E402
import trees  # noqa: E402
from support import Lab, http_call, release_files, sandboxed  # noqa: E402

PYTHON = "/usr/bin/python3"
FINAL = ("succeeded", "failed", "rolled_back")


def vm_hwm_kb(sb, pid):
    text = sb.run(["cat", f"/proc/{pid}/status"]).stdout
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    return int(fields["VmHWM"].split()[0])


def machine_busy():
    """CPU seconds all CPUs of the machine have been busy since boot (/proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def cpu_of(sb, pids):
    """CPU seconds (user + system) used so far by these processes of the sandbox."""
    text = sb.run(["sh", "-c", " ".join(f"cat /proc/{p}/stat;" for p in pids)]).stdout
    total = 0
    for line in text.splitlines():
        fields = line.rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def main_pid(sb, unit):
    return int(sb.run(["systemctl", "show", unit, "-p", "MainPID"]).stdout.strip().split("=")[1])


def wait_answering(addresses, timeout=120):
    deadline = time.monotonic() + timeout
    left = list(addresses)
    while left and time.monotonic() < deadline:
        still = []
        for address in left:
            try:
                http_call(3081, "GET", "/status", host=address, timeout=2)
            except OSError:
                still.append(address)
        left = still
        if left:
            time.sleep(0.2)
    if left:
        sys.exit(f"bench: {len(left)} agent managers did not answer: {left[:5]}")


def agent_manager(sb, work, name, address, service, nas_url, settle="0"):
    """Start one agent manager as a transient unit; returns its unit name."""
    base = os.path.join(work, name)
    install, state = os.path.join(base, "install"), os.path.join(base, "state")
    os.makedirs(install, exist_ok=True)
    unit = f"bench-{name}-manager.service"
    result = sb.run(["systemd-run", f"--unit={unit}", "--quiet", "--collect",
                     "--property=DefaultDependencies=no", PYTHON, MANAGER, "serve",
                     "--role", "agent", "--bind", address, "--port", "3081",
                     "--service", service, "--install-dir", install, "--state-dir", state,
                     "--nas-url", nas_url, "--settle", settle])
    if result.returncode != 0:
        sys.exit(f"bench: cannot start {unit}: {result.stderr}")
    return unit, install


MANAGER = os.path.join(os.path.dirname(HERE), "backend_ai_manager.py")


def status_bench(lab, args):
    sb, nas = lab.sandbox, lab.nas
    sb.add_unit("bench-shared.service", sandboxed(
        "[Unit]\nDescription=shared\n[Service]\nExecStart=/bin/sleep infinity\n"))
    sb.systemctl("start", "bench-shared.service")
    addresses = [f"127.5.{n // 250}.{n % 250 + 1}" for n in range(args.agents)]
    units = []
    started = time.monotonic()
    for n, address in enumerate(addresses):
        unit, install = agent_manager(sb, lab.work, f"s{n}", address, "bench-shared.service",
                                      nas.url_template("agent"))
        with open(os.path.join(install, "package.json"), "w") as f:
            f.write('{"name": "agent", "version": "2.0.10"}\n')
        units.append(unit)
    wait_answering(addresses)
    print(f"{args.agents} agent managers up in {time.monotonic() - started:.1f} s")
    listed = os.path.join(lab.work, "agents")
    with open(listed, "w") as f:
        f.write("\n".join(addresses) + "\n")
    hub = lab.host("hub", python=PYTHON, settle=0, env={"BACKEND_AI_AGENTS": f"@{listed}"})
    hub.install_base("2.0.10")
    hub.start()
    pid = hub.manager_pid()
    # The start's peak (compiling the file, about 27 MB) is above the idle daemon and would hide
    # any growth: reset the peak (clear_refs 5, proc(5)), then take the idle one.
    sb.run(["sh", "-c", f"echo 5 > /proc/{pid}/clear_refs"])
    for _ in range(10):
        hub.api("GET", "/status")
    idle = vm_hwm_kb(sb, pid)

    def timed(runs):
        times = []
        for _ in range(runs):
            t = time.monotonic()
            status, body = hub.api("GET", "/agents", timeout=30)
            times.append(time.monotonic() - t)
            assert status == 200, body
        return times, body["summary"]

    times, summary = timed(5)
    print(f"\nGET /agents, {args.agents} agents all up: median {statistics.median(times):.3f} s "
          f"(runs {', '.join(f'{t:.3f}' for t in times)}), reachable {summary['reachable']} "
          f"(target under 1 s)")
    dead = addresses[:args.dead]
    silent = []
    for n, address in enumerate(dead):
        sb.systemctl("stop", units[n])
        if n % 2:  # accepts, never answers
            listener = socket.socket()
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((address, 3081))
            listener.listen(16)
            silent.append(listener)
    times, summary = timed(3)
    print(f"GET /agents, {args.dead} of them dead ({args.dead - len(silent)} refusing, "
          f"{len(silent)} silent): median {statistics.median(times):.3f} s (runs "
          f"{', '.join(f'{t:.3f}' for t in times)}), reachable {summary['reachable']} "
          "(target at most 5.5 s)")
    peak = vm_hwm_kb(sb, pid)
    print(f"hub manager VmHWM: idle {idle / 1024:.1f} MB, after {8} GET /agents "
          f"{peak / 1024:.1f} MB: growth {(peak - idle) / 1024:.1f} MB (target at most 5 MB)")
    for listener in silent:
        listener.close()
    for unit in units:
        sb.run(["systemctl", "stop", "--no-block", unit])
    hub.stop()


def update_alone(address, version, poll=0.005):
    """Seconds from POST /update to a final state, polling the agent every `poll` seconds."""
    t = time.monotonic()
    status, _, body = http_call(3081, "POST", "/update", {"version": version}, host=address)
    assert status == 200, body
    while True:
        record = http_call(3081, "GET", "/update", host=address)[2]
        if record["state"] in FINAL:
            assert record["state"] == "succeeded", record
            return time.monotonic() - t
        time.sleep(poll)


def drive_without_hub(fleet, version, parallel):
    """The baseline scheduler: this bench's own threads update the agents, `parallel` at once,
    each sending its agent's POST /update as soon as a thread is free and polling it every
    50 ms (the hub's shortest interval). Returns the total seconds."""
    work = queue.SimpleQueue()
    for address in fleet:
        work.put(address)
    errors = []

    def worker():
        while True:
            try:
                address = work.get_nowait()
            except queue.Empty:
                return
            try:
                update_alone(address, version, poll=0.05)
            except Exception as e:  # reported below
                errors.append(f"{address}: {e}")

    t = time.monotonic()
    threads = [threading.Thread(target=worker) for _ in range(parallel)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        sys.exit(f"bench: the baseline driver failed: {errors[:3]}")
    return time.monotonic() - t


def hub_rollout(sb, hub, fleet, version, agent_pids):
    """One rollout of `version` by the hub manager; returns its figures."""
    hub_pid = hub.manager_pid()
    cpu_agents, cpu_hub, cpu_init = cpu_of(sb, agent_pids), cpu_of(sb, [hub_pid]), cpu_of(sb, [1])
    busy = machine_busy()
    t = time.monotonic()
    status, body = hub.api("POST", "/update", {"version": version, "target": "agents"})
    assert status == 200, body
    while True:  # every 50 ms: the hub's record says when the rollout ended, to the ms
        rollout = hub.api("GET", "/update")[1]["agents"]
        if rollout["state"] not in ("pending", "rolling"):
            break
        time.sleep(0.05)
    wall = time.monotonic() - t
    figures = {
        "wall": wall, "rollout": rollout,
        "busy": machine_busy() - busy,
        "cpu_agents": cpu_of(sb, agent_pids) - cpu_agents,
        "cpu_hub": cpu_of(sb, [hub_pid]) - cpu_hub,
        "cpu_init": cpu_of(sb, [1]) - cpu_init}
    with open(os.path.join(hub.state_dir, "rollout.json")) as f:
        log = json.load(f)["log"]
    figures["total"] = log[-1]["elapsed"]  # from the rollout's begin to its end, hub's clock
    if os.environ.get("BENCH_STEPS"):
        for entry in log:
            print(f"    {entry['elapsed']:7.3f} {entry['message'][:90]}")
    on_version = sum(http_call(3081, "GET", "/version", host=a)[2]["version"] == version
                     for a in fleet)
    # On one machine the agents at once share its CPUs: each agent's own update (its own
    # record's elapsed time) takes longer than alone.
    figures["own"] = [http_call(3081, "GET", "/update", host=a)[2]["log"][-1]["elapsed"]
                      for a in fleet]
    print(f"  hub rollout to {version}: {figures['total']:.2f} s by the hub's record "
          f"({wall:.2f} s seen here), ended {rollout['state']} {rollout['counts']}, "
          f"{on_version} agents answer {version}; each agent's own update: median "
          f"{statistics.median(figures['own']):.3f} s (max {max(figures['own']):.3f} s)")
    return figures


def rollout_bench(lab, args):
    sb, nas = lab.sandbox, lab.nas
    for version in ("2.0.10", "2.0.11", "2.0.12"):
        nas.publish(version, release_files(version), kind="agent")
    addresses = [f"127.6.0.{n + 1}" for n in range(args.rollout_agents)] + ["127.6.1.1"]
    for n, address in enumerate(addresses):
        service = f"bench-r{n}.service"
        install = os.path.join(lab.work, f"r{n}", "install")
        os.makedirs(install)
        trees.gnu_extract_into(nas.tarball("2.0.10", "agent"), install)
        port = 20000 + n
        with open(os.path.join(sb.units_dir, service), "w") as f:
            f.write(sandboxed(f"[Unit]\nDescription=r{n}\nStartLimitIntervalSec=0\n[Service]\n"
                              f"WorkingDirectory={install}\nEnvironment=PORT={port}\n"
                              f"ExecStart={PYTHON} -u {install}/dist/server.py\n"))
    sb.run(["systemctl", "daemon-reload"], check=True)
    for n, address in enumerate(addresses):
        sb.systemctl("start", f"bench-r{n}.service")
        agent_manager(sb, lab.work, f"r{n}", address, f"bench-r{n}.service",
                      nas.url_template("agent"))
    wait_answering(addresses)
    alone = addresses[-1]
    singles = [update_alone(alone, v) for v in ("2.0.11", "2.0.12") * 3]
    single = statistics.median(singles)
    # The CPU of one update alone, over six more, polled every 50 ms (polling every 5 ms, as
    # for the time, would add this bench's own CPU to the figure).
    busy = machine_busy()
    for v in ("2.0.11", "2.0.12") * 3:
        update_alone(alone, v, poll=0.05)
    cpu_single = (machine_busy() - busy) / 6
    fleet = addresses[:-1]
    hub = lab.host("hub-rollout", python=PYTHON, settle=0, env={
        "BACKEND_AI_AGENTS": ",".join(fleet), "BACKEND_AI_ROLLOUT_BATCHES": "100%",
        "BACKEND_AI_ROLLOUT_PARALLEL": str(args.parallel)})
    hub.install_base("2.0.10")
    hub.start()
    agent_pids = [main_pid(sb, f"bench-r{n}-manager.service") for n in range(len(fleet))]
    waves = math.ceil(len(fleet) / args.parallel)
    print(f"\nrollout to {len(fleet)} agents, --rollout-batches 100% --rollout-parallel "
          f"{args.parallel} ({waves} waves), --settle 0; alternately driven by this bench "
          "(the baseline) and by the hub:")
    drives, rollouts = [], []
    for version, hub_first in (("2.0.11", False), ("2.0.12", True), ("2.0.11", True),
                               ("2.0.12", False)):
        if hub_first:
            rollouts.append(hub_rollout(sb, hub, fleet, version, agent_pids))
        else:
            drives.append(drive_without_hub(fleet, version, args.parallel))
            print(f"  baseline driver to {version}: {drives[-1]:.2f} s")
    total = statistics.median(f["total"] for f in rollouts)
    ideal = waves * single
    print(f"  one agent's update alone: median {single:.3f} s (runs "
          f"{', '.join(f'{s:.3f}' for s in singles)})")
    print(f"  {waves} waves x {single:.3f} = {ideal:.2f} s; the hub's rollout (median of "
          f"{len(rollouts)}) {total:.2f} s: ratio {total / ideal:.2f}x (information: see the CPU "
          "floor below)")
    own = statistics.median(statistics.median(f["own"]) for f in rollouts)
    print(f"  against {waves} waves x each agent's own update during the rollout "
          f"({own:.3f} s) = {waves * own:.2f} s: ratio {total / (waves * own):.2f}x")
    drive = statistics.median(drives)
    print(f"  against the baseline driver (median of {len(drives)}, {drive:.2f} s): ratio "
          f"{total / drive:.2f}x (target at most 1.1x)")
    # The machine's own floor: the updates need their CPU time whoever schedules them.
    cpus = os.cpu_count()
    floor = len(fleet) * cpu_single / cpus
    print(f"  CPU: one agent's update alone used {cpu_single * 1000:.0f} ms of the machine's "
          f"CPU (all processes: manager, systemctl, systemd, the service starting); "
          f"{len(fleet)} of them need {len(fleet) * cpu_single:.2f} CPU-s = {floor:.2f} s on "
          f"{cpus} CPUs at best, {floor / ideal:.1f}x the ideal; the hub's rollout "
          f"{total / floor:.2f}x that floor")
    for f in rollouts:
        print(f"  CPU during a hub rollout: {f['busy']:.2f} CPU-s busy of "
              f"{cpus * f['wall']:.2f} available ({f['busy'] / (cpus * f['wall']):.0%}); hub "
              f"manager {f['cpu_hub']:.2f} s, the {len(fleet)} agent managers "
              f"{f['cpu_agents']:.2f} s, the sandbox's systemd {f['cpu_init']:.2f} s, the rest "
              f"(services, systemctl, journald, this bench) "
              f"{f['busy'] - f['cpu_hub'] - f['cpu_agents'] - f['cpu_init']:.2f} s")
    hub.stop()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--agents", type=int, default=200)
    parser.add_argument("--dead", type=int, default=20)
    parser.add_argument("--rollout-agents", type=int, default=50)
    parser.add_argument("--parallel", type=int, default=10)
    parser.add_argument("--skip-status", action="store_true")
    parser.add_argument("--skip-rollout", action="store_true")
    args = parser.parse_args()
    reason = sandbox_mod.unavailable_reason()
    if reason:
        sys.exit(f"bench: {reason}")
    with Lab("bench-fleet") as lab:
        if not args.skip_status:
            status_bench(lab, args)
        if not args.skip_rollout:
            rollout_bench(lab, args)


if __name__ == "__main__":
    main()
