"""`make demo`: the manager doing its job for real, start to finish, in about ten seconds.

Boots a throwaway systemd (with journald) in its own namespace, installs a demo hub service at
version 2.0.10 and the manager (from systemd/ai-hub-manager.service), serves a NAS on loopback
that holds release 2.0.11, then walks through every endpoint and an update, printing each request
as the curl command an operator would type and the manager's real answer. Powers the sandbox off
and removes everything it made, also on failure. Needs root (for the namespace)."""

import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import sandbox as sandbox_mod  # noqa: E402
from support import Lab, release_files  # noqa: E402

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
        print(f"make demo: cannot boot the throwaway systemd here: {reason}", file=sys.stderr)
        return 1
    say("Booting a throwaway systemd (PID 1 of its own namespace, with journald)")
    lab = Lab("demo")
    try:
        with lab:
            print(f"  systemd is {lab.sandbox.state} after {lab.boot_seconds:.2f} s")
            return walk_through(lab)
    finally:
        print(f"\n{DIM}(sandbox powered off; {lab.work} removed){RESET}")


def walk_through(lab):
    say("A NAS on loopback holding release 2.0.11 (a real .tar.gz and its .sha256)")
    nas = lab.nas
    path = nas.publish("2.0.11", release_files("2.0.11"))
    print(f"  {nas.url_template().replace('{version}', '2.0.11')}  ({os.path.getsize(path)} "
          "bytes: dist/, package.json, node_modules/ with a .bin symlink)")

    say("The host: ai-hub.service at 2.0.10 (laid out by hand, with its own config.json), "
        "and ai-hub-manager.service")
    host = lab.host(settle=2)
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

    say("Rollback to the release before")
    show(host, "POST", "/rollback")
    record = host.wait_update()
    print(f"  GET /update -> {record['state']}: {record['step']}")
    outside(host, f"the hub now says version {host.service_info()['version']}")

    say("Done: every endpoint answered against a real systemd")
    return 0


if __name__ == "__main__":
    sys.exit(main())
