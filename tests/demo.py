"""`make demo`: the manager doing its job for real, start to finish, in about ten seconds.

Boots a throwaway systemd (with journald) in its own namespace, installs the real Node hub
(tests/fixtures/node-hub: express and typescript from the npm registry) at version 2.0.10 and the
manager (from systemd/ai-hub-manager.service), serves a NAS on loopback that holds release 2.0.11,
then walks through every endpoint, an update and a rollback, printing each request as the curl
command an operator would type and the manager's real answer, and checks the installed tree
against GNU tar's extraction of the release, byte for byte. Powers the sandbox off and removes
everything it made, also on failure or Ctrl-C. Needs root (for the namespace), node and npm."""

import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
BAM = os.path.join(os.path.dirname(HERE), "backend_ai_manager.py")
sys.path.insert(0, HERE)

import nodehub  # noqa: E402
import sandbox as sandbox_mod  # noqa: E402
import trees  # noqa: E402
from support import Lab, bam  # noqa: E402

BOLD, DIM, GREEN, RED, RESET = ("\033[1m", "\033[2m", "\033[32m", "\033[31m", "\033[0m") \
    if sys.stdout.isatty() else ("",) * 5


def say(text):
    print(f"\n{BOLD}== {text}{RESET}", flush=True)


def show(host, method, path, body=None, quiet_keys=()):
    """Call the manager, print the curl equivalent and the answer; return the answer."""
    url = f"http://127.0.0.1:{host.port}{path}"
    curl = f"curl -s {url}" if method == "GET" else f"curl -s -X {method} {url}"
    if body is not None:
        curl += f" -H 'Content-Type: application/json' -d '{json.dumps(body)}'"
    print(f"{DIM}${RESET} {curl}")
    status, answer = host.api(method, path, body)
    shown = {k: ("..." if k in quiet_keys else v) for k, v in answer.items()} \
        if isinstance(answer, dict) else answer
    print(f"  {GREEN if status < 400 else RED}HTTP {status}{RESET} {json.dumps(shown)}")
    return answer


def outside(host, text):
    print(f"  {DIM}(seen from outside the manager: {text}){RESET}")


def main():
    reason = sandbox_mod.unavailable_reason()
    if reason:
        print(f"make demo: cannot boot the throwaway systemd here: {reason} (run it as root on "
              "a machine with util-linux and systemd)", file=sys.stderr)
        return 1
    reason = nodehub.unavailable_reason()
    if reason:
        print(f"make demo: cannot build the Node hub here: {reason} (install node 20 and npm)",
              file=sys.stderr)
        return 1
    say("Booting a throwaway systemd (PID 1 of its own namespace, with journald)")
    lab = Lab("demo")
    try:
        with lab:
            print(f"  systemd is {lab.sandbox.state} after {lab.boot_seconds:.2f} s; "
                  f"the lab is {lab.work}")
            return walk_through(lab)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        if lab.work:
            print(f"\n{DIM}(sandbox powered off; {lab.work} removed){RESET}")


def check_tree(host, version):
    """Compare what the hub sees through the install dir with GNU tar's extraction of the
    release's tarball; print the verdict; return True if identical."""
    expected = host.nas.expected_tree(version)
    diff = trees.differences(expected, trees.installed(host.install_dir, expected))
    kinds = [entry[0] for entry in expected.values()]
    if diff:
        print(f"  {RED}installed tree differs from {host.kind}-{version}.tar.gz:{RESET}")
        for line in diff:
            print(f"    {line}")
        return False
    print(f"  {host.address}: installed tree = GNU tar's extraction of {host.kind}-{version}.tar.gz,"
          " byte for byte: "
          f"{kinds.count('file')} files, {kinds.count('link')} links, {kinds.count('dir')} "
          "folders (names, contents, link targets, execute bits)")
    return True


def walk_through(lab):
    say("The real Node hub: npm ci (express, typescript) and tsc, as a build script would")
    started = time.monotonic()
    prepared = nodehub.prepare(lab.work)
    print(f"  built in {time.monotonic() - started:.1f} s")

    say("A NAS on loopback holding releases 2.0.10 and 2.0.11 (`tar czf hub-V.tar.gz -C build .`"
        " and a .sha256)")
    nas = lab.nas
    host = lab.host(settle=2, node=prepared)
    for version in ("2.0.10", "2.0.11"):
        path = host.publish(version)
        print(f"  {nas.url_template().replace('{version}', version)}  "
              f"({os.path.getsize(path) / 1e6:.1f} MB: dist/, package.json, package-lock.json, "
              "node_modules/ with .bin links)")

    say("The host: ai-hub.service (node dist/index.js) at 2.0.10, installed by hand with "
        "tar xzf, with its own config.json; and ai-hub-manager.service")
    host.install_base("2.0.10", greeting="config.json survives updates")
    host.start()
    print(f"  install dir {host.install_dir}: {sorted(os.listdir(host.install_dir))}")
    print(f"  manager listening on 127.0.0.1:{host.port}; the hub answers on "
          f"127.0.0.1:{host.service_port}: {json.dumps(host.service_info())}")

    say("Status")
    show(host, "GET", "/status")

    say("Stop, start, restart: systemd does the work")
    show(host, "POST", "/stop")
    outside(host, f"systemctl is-active ai-hub.service -> {host.is_active()}")
    show(host, "POST", "/start")
    outside(host, f"systemctl is-active ai-hub.service -> {host.is_active()}, "
            f"MainPID {host.main_pid()}")
    show(host, "POST", "/restart")
    outside(host, f"MainPID is now {host.main_pid()}")

    say("Logs (journald) and version (package.json)")
    answer = show(host, "GET", "/logs?lines=4", quiet_keys=("logs",))
    for line in answer["logs"].splitlines():
        print(f"    | {line}")
    show(host, "GET", "/version")

    say("Update to 2.0.11: answers at once, works in the background")
    show(host, "POST", "/update", {"version": "2.0.11"})
    seen = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        _, record = host.api("GET", "/update")
        if record["step"] and (not seen or seen[-1] != record["step"]):
            seen.append(record["step"])
            print(f"  GET /update -> {record['state']:<11} {record['step']}")
        if record["state"] in ("succeeded", "failed", "rolled_back"):
            break
        time.sleep(0.05)
    print("  the job's own log (GET /update):")
    for entry in record["log"]:
        print(f"    {entry['at']} {entry['state']:<11} {entry['message']}")
    if record["state"] != "succeeded":
        print(f"{RED}update ended {record['state']}: {record['error']}{RESET}")
        return 1
    show(host, "GET", "/version")
    info = host.service_info()
    outside(host, f"the hub itself now says {json.dumps(info)}")
    links = {e: os.readlink(os.path.join(host.install_dir, e))
             for e in sorted(os.listdir(host.install_dir))
             if os.path.islink(os.path.join(host.install_dir, e))}
    print(f"  install dir now links into the kept releases: {json.dumps(links)}")
    if info["version"] != "2.0.11" or info["greeting"] != "config.json survives updates":
        print(f"{RED}the new code is not running as expected{RESET}")
        return 1
    if not check_tree(host, "2.0.11"):
        return 1

    say("Rollback to the release before")
    show(host, "POST", "/rollback")
    record = host.wait_update()
    print(f"  GET /update -> {record['state']}: {record['step']}")
    info = host.service_info()
    outside(host, f"the hub now says version {info['version']}")
    if record["state"] != "succeeded" or info["version"] != "2.0.10" or \
            not check_tree(host, "2.0.10"):
        return 1

    if fleet(lab, host, prepared) != 0:
        return 1
    say("Done: every endpoint answered against a real systemd")
    return 0


def fleet(lab, hub, prepared):
    """A hub with two agents: GET /agents, then an update the hub rolls out to them."""
    say("Two agent hosts: ai-agent-manager.service on 127.0.4.1:3081 and 127.0.4.2:3081, "
        "each controlling its own ai-agent service at 2.0.10")
    agents = []
    for n in (1, 2):
        agent = lab.host(f"agent{n}", settle=1, node=prepared, role="agent", name=str(n),
                         address=f"127.0.4.{n}", port=3081,
                         env={"BACKEND_AI_MANAGER_TRIAL": "3"})
        agent.install_base("2.0.10")
        agent.start()
        agents.append(agent)
    agent_list = ",".join(f"{a.address}:3081" for a in agents)
    hub.restart_manager(BACKEND_AI_AGENTS=agent_list, BACKEND_AI_ROLLOUT_BATCHES="1,100%",
                        BACKEND_AI_MANAGER_TRIAL="3")
    print(f"  the hub's manager restarted with BACKEND_AI_AGENTS={agent_list} "
          "BACKEND_AI_ROLLOUT_BATCHES=1,100% (the first agent is the canary) "
          "BACKEND_AI_MANAGER_TRIAL=3 (a new manager's trial, 30 s by default)")
    answer = show(hub, "GET", "/agents", quiet_keys=("agents",))
    for entry in answer["agents"]:
        print(f"    {entry['agent']:<15} reachable={entry['reachable']} running={entry['running']}"
              f" version={entry['version']} rtt={entry['rtt_ms']} ms")

    LAB_DIR[:] = [lab.work]
    newer = f"{bam.__version__}.1"
    say(f"Deploying 2.0.12 with the client: `pack` the build into the NAS share for the hub and "
        f"the agents, with a newer manager ({newer}, this file with its version raised) riding "
        "along, then `update` on the hub, which follows the hub's update and the rollout; each "
        "manager then updates itself in place")
    build = nodehub.build(prepared, "2.0.12", os.path.join(lab.work, "build-2.0.12"))
    manager = os.path.join(lab.work, "newer-manager", "backend_ai_manager.py")
    os.makedirs(os.path.dirname(manager))
    with open(BAM) as f, open(manager, "w") as out:
        out.write(f.read().replace(f'__version__ = "{bam.__version__}"',
                                   f'__version__ = "{newer}"', 1))
    for kind in ("hub", "agent"):
        if client(["pack", build, "--kind", kind, "--out", hub.nas.root], manager) != 0:
            return 1
    if client(["update", "2.0.12", "--host", f"127.0.0.1:{hub.port}"]) != 0:
        return 1
    for node in [hub] + agents:
        if node.service_info()["version"] != "2.0.12" or not check_tree(node, "2.0.12"):
            return 1
    deadline = time.monotonic() + 30  # the hub takes its own manager after the rollout
    while hub.api("GET", "/status")[1]["manager"]["version"] != newer:
        if time.monotonic() > deadline:
            return 1
        time.sleep(0.2)
    if client(["agents", "--host", f"127.0.0.1:{hub.port}"]) != 0 or \
            client(["status", "--host", f"127.0.0.1:{hub.port}"]) != 0:
        return 1
    answer = show(hub, "GET", "/agents", quiet_keys=("agents",))
    summary = answer["summary"]
    return 0 if summary["versions"] == {"2.0.12": 2} and summary["manager_versions"] == {
        newer: 2} and summary["manager_skew"] == [] else 1


LAB_DIR = []  # the lab's folder, shown as $LAB in the client's lines


def client(args, manager=None):
    """Run the client (this checkout's backend_ai_manager.py, or `manager`) as an operator
    would, showing the command and its output as it comes; return its exit status."""
    shown = " ".join(args).replace(LAB_DIR[0], "$LAB") if LAB_DIR else " ".join(args)
    name = manager.replace(LAB_DIR[0], "$LAB") if manager else "backend_ai_manager.py"
    print(f"{DIM}${RESET} python3 {name} {shown}", flush=True)
    process = subprocess.Popen([sys.executable, manager or BAM] + args, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    for line in process.stdout:
        line = line.replace(LAB_DIR[0], "$LAB") if LAB_DIR else line
        print(f"  {line}", end="", flush=True)
    code = process.wait()
    if code != 0:
        print(f"  {RED}exit status {code}{RESET}")
    return code


if __name__ == "__main__":
    sys.exit(main())
