"""End to end: the operator's client (`backend_ai_manager.py COMMAND`, issue 12), run as a
subprocess against real managers in the systemd sandbox, which download real tarballs from a
NAS on loopback.

- `host`: one hub manager (127.0.0.1, a free port) controlling the small Python stand-in service:
  every subcommand, every exit status (0 done, 1 failed, 2 usage, 3 not running, 4 unreachable),
  --json, the bearer token, and the progress of `update` on a pipe and on a pseudo-terminal. The
  NAS sends the tarballs of a few versions throttled (its `throttle:N` fault), so that a
  download lasts several of the client's polls.
- `fleet`: a hub manager on 127.0.7.1:3081 with three agent managers on 127.0.7.2-4:3081 (own
  addresses: no other test file uses them): `agents` and `update` with a rollout.
- `node_host`: the real Node hub (express + TypeScript, `npm ci`ed), updated to a release made by
  `pack`, compared byte for byte with GNU tar's extraction of the packed tarball.

Every manager gets a loopback NAS URL; none ever uses its default (192.168.x)."""

import hashlib
import json
import os
import pty
import re
import select
import shutil
import socket
import subprocess
import sys
import time
import tty

import pytest

import nodehub
import trees
from support import MANAGER, Host, Nas, fleet_hosts, sha256_of, started_hosts

from conftest import INTERPRETERS, interpreter

PYTHON = "/usr/bin/python3"  # runs the managers; the client runs under sys.executable
TOKEN = "client-fleet-token-0123456789"
HUB_ADDRESS = "127.0.7.1"
AGENTS = [f"127.0.7.{n}:3081" for n in (2, 3, 4)]
SLOW_VERSIONS = ("2.0.20", "2.0.21")  # served at SLOW_RATE by the NAS
SLOW_RATE = 2 << 20                   # bytes per second
SLOW_PAYLOAD = 3 << 20                # incompressible bytes in each slow release: ~1.5 s
STAMP = re.compile(r"^\[ *(\d+\.\d)s\] (\w+): (.*)$")
AGENT_LINE = re.compile(r"^\[ *\d+\.\ds\] agent (\S+) \(batch (\d+)\): (\w+), (\S+) -> (\S+)"
                        r"(: .*)?$")
CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f]")  # any control character but \n


# ---------------------------------------------------------------------------------------------
# Running the client
# ---------------------------------------------------------------------------------------------

def client_env():
    """The environment without the client's own defaults (BACKEND_AI_HOST, ..._TOKEN_FILE)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("BACKEND_AI_")}


def client(*args, host=None, python=None, env=None, timeout=120):
    """Run `backend_ai_manager.py ARGS [--host HOST]`; returns the CompletedProcess (text)."""
    argv = [python or sys.executable, MANAGER, *args]
    if host:
        argv += ["--host", host]
    return subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=timeout,
                          env=dict(client_env(), **(env or {})))


def on(host):
    return f"{host.address}:{host.port}"


def show(run):
    return f"exit {run.returncode}\n--- stdout:\n{run.stdout}\n--- stderr:\n{run.stderr}"


def stamped(out):
    """[(seconds, state, message)] of the client's step lines."""
    return [(float(m.group(1)), m.group(2), m.group(3))
            for m in map(STAMP.match, out.splitlines()) if m]


def closed_port():
    """A loopback port nothing listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def installed_version(host):
    with open(os.path.join(host.install_dir, "package.json")) as f:
        return json.load(f)["version"]


# ---------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def host(sandbox, nas, work_dir):
    """A hub manager on 127.0.0.1 (free port) for the Python stand-in service at 2.0.10; its
    NAS is the module's NAS, sending the SLOW_VERSIONS' tarballs at SLOW_RATE."""
    base = os.path.join(work_dir, "client-host")
    os.makedirs(base)
    for version in SLOW_VERSIONS:
        nas.faults[f"/api/raw/{version}/hub-{version}.tar.gz"] = f"throttle:{SLOW_RATE}"
    h = Host(sandbox, base, nas, python=PYTHON, settle=0.5, name="client")
    for version in ("2.0.10", "2.0.11", "2.0.12"):
        h.publish(version)
    h.publish("2.0.13", crash=True)
    for version in SLOW_VERSIONS:
        h.publish(version, extra={"dist/assets/blob.bin": os.urandom(SLOW_PAYLOAD)})
    h.install_base("2.0.10")
    try:
        h.start()
        yield h
    finally:
        h.stop()
        for version in SLOW_VERSIONS:
            nas.faults.pop(f"/api/raw/{version}/hub-{version}.tar.gz", None)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def fleet(sandbox, work_dir):
    """A hub manager on 127.0.7.1:3081 and three agent managers on 127.0.7.2-4:3081 (each
    requiring the agent token, which the hub sends), all at 2.0.10 of the stand-in service,
    with a NAS of their own."""
    base = os.path.join(work_dir, "client-fleet")
    os.makedirs(base)
    fleet_nas = Nas(os.path.join(base, "nas")).start()
    token = os.path.join(base, "token")
    with open(token, "w") as f:
        f.write(TOKEN + "\n")
    os.chmod(token, 0o600)
    hub, agents, _ = fleet_hosts(
        sandbox, base, fleet_nas, AGENTS, token, {
            "BACKEND_AI_ROLLOUT_BATCHES": "1,100%", "BACKEND_AI_ROLLOUT_PARALLEL": "2",
            "BACKEND_AI_ROLLOUT_AGENT_TIMEOUT": "60"},
        agent_name=lambda n: f"client-{n}",
        hub_options={"name": "client-hub", "address": HUB_ADDRESS, "port": 3081},
        python=PYTHON, settle=0.5)
    try:
        with started_hosts(agents + [hub]):
            yield hub, agents
    finally:
        fleet_nas.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def node_host(sandbox, work_dir, node_hub):
    """The real Node hub at 2.0.10 (installed by hand with GNU tar), with a NAS of its own."""
    base = os.path.join(work_dir, "client-node")
    os.makedirs(base)
    node_nas = Nas(os.path.join(base, "nas")).start()
    h = Host(sandbox, os.path.join(base, "host"), node_nas, python=PYTHON, settle=1,
             node=node_hub, name="client-node")
    h.install_base("2.0.10")
    try:
        h.start()
        yield h
    finally:
        h.stop()
        node_nas.stop()
        shutil.rmtree(base, ignore_errors=True)


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def agent_versions(agents):
    return [a.api("GET", "/version", headers=AUTH)[1]["version"] for a in agents]


# ---------------------------------------------------------------------------------------------
# status, version, logs, start, stop, restart
# ---------------------------------------------------------------------------------------------

def test_status_version_and_logs_print_the_real_service(host):
    run = client("status", host=on(host))
    assert run.returncode == 0, show(run)
    lines = run.stdout.splitlines()
    assert re.fullmatch(rf"{re.escape(host.SERVICE)}: active \(running\) since \S+Z, pid "
                        rf"{host.main_pid()}, \d+ restarts", lines[0]), show(run)
    version = installed_version(host)
    assert f"version: {version} @proxmox-ai-control/hub" in lines, show(run)
    assert re.fullmatch(r"manager: \S+ \(hub, good\), hardening: full", lines[-1]), show(run)
    assert run.stderr == ""

    run = client("version", host=on(host))
    assert (run.returncode, run.stdout) == (0, f"{version} @proxmox-ai-control/hub\n"), show(run)

    # A restart adds its lines (stopping, stopped, started, listening): more than 3 in all.
    assert host.sandbox.systemctl("restart", host.SERVICE).returncode == 0
    host.service_info()
    run = client("logs", "-n", "50", host=on(host))
    assert run.returncode == 0, show(run)
    assert f"listening on 127.0.0.1:{host.service_port}" in run.stdout, show(run)
    everything = run.stdout.splitlines()
    run = client("logs", "-n", "3", host=on(host))
    assert run.returncode == 0, show(run)
    last = run.stdout.splitlines()
    assert 1 <= len(last) <= 3 and last == everything[-len(last):], show(run)
    assert len(everything) > 3, "the journal is too short for -n 3 to mean anything"
    run = client("logs", "--lines", "1", host=on(host))
    assert run.returncode == 0 and run.stdout.splitlines() == everything[-1:], show(run)


def test_stop_then_status_exits_3_start_and_restart(host):
    try:
        run = client("stop", host=on(host))
        assert run.returncode == 0, show(run)
        assert run.stdout.splitlines()[0] == f"{host.SERVICE}: stop done", show(run)
        assert f"{host.SERVICE}: inactive (dead)" in run.stdout, show(run)
        assert host.is_active() == "inactive"

        run = client("status", host=on(host))
        assert run.returncode == 3, show(run)
        assert run.stdout.startswith(f"{host.SERVICE}: inactive (dead)"), show(run)
        run = client("status", "--json", host=on(host))
        assert run.returncode == 3 and json.loads(run.stdout)["running"] is False, show(run)

        run = client("stop", host=on(host))
        assert run.returncode == 0, show(run)
        assert run.stdout.splitlines()[0] == f"{host.SERVICE}: stop nothing to do", show(run)

        run = client("start", host=on(host))
        assert run.returncode == 0, show(run)
        assert run.stdout.splitlines()[0] == f"{host.SERVICE}: start done", show(run)
        assert f"{host.SERVICE}: active (running)" in run.stdout, show(run)
        assert host.is_active() == "active"
    finally:
        if host.is_active() != "active":
            host.sandbox.systemctl("start", host.SERVICE)
    before = host.main_pid()
    run = client("restart", host=on(host))
    assert run.returncode == 0, show(run)
    assert run.stdout.splitlines()[0] == f"{host.SERVICE}: restart done", show(run)
    after = host.main_pid()
    assert after != before and f"pid {after}," in run.stdout, show(run)
    assert client("status", host=on(host)).returncode == 0
    assert host.service_info()["version"] == installed_version(host)


@pytest.mark.parametrize("label", sorted(INTERPRETERS))
def test_the_client_runs_under_every_interpreter(host, label):
    python = interpreter(label)
    run = client("status", "--json", host=on(host), python=python)
    assert run.returncode == 0, show(run)
    assert json.loads(run.stdout)["service"] == host.SERVICE
    run = client("version", host=on(host), python=python)
    assert run.returncode == 0 and run.stdout == \
        f"{installed_version(host)} @proxmox-ai-control/hub\n", show(run)


# ---------------------------------------------------------------------------------------------
# Exit statuses 2 and 4; the token
# ---------------------------------------------------------------------------------------------

def test_an_unreachable_manager_exits_4():
    address = f"127.0.0.1:{closed_port()}"
    for args in (("status",), ("version",), ("logs", "-n", "3"), ("restart",),
                 ("update", "2.0.11"), ("agents",), ("status", "--json")):
        started = time.monotonic()
        run = client(*args, host=address)
        assert run.returncode == 4, (args, show(run))
        assert f"cannot reach the manager at {address}" in run.stderr, (args, show(run))
        assert run.stdout == "", (args, show(run))
        assert time.monotonic() - started < 10, args


@pytest.mark.parametrize("args, words", [
    ((), "usage"),
    (("frobnicate",), "invalid choice"),
    (("status", "--bogus"), "unrecognized arguments"),
    (("logs", "-n", "many"), "invalid line count"),
    (("logs", "-n", "0"), "invalid line count"),
    (("update",), "required"),
    (("update", "2.0.11", "--target", "moon"), "invalid choice"),
    (("pack", "somewhere", "--out", "nowhere"), "--kind"),
    (("status", "--host", "   "), "--host is empty"),
    (("status", "--host", "not a host!"), "invalid --host"),
    (("status", "--host", "127.0.0.1:1", "--token-file", "/nonexistent/token"),
     "--token-file /nonexistent/token is not valid: cannot read it"),
    (("status", "--host", "127.0.0.1:1", "--token-file", "/dev/null"),
     "--token-file /dev/null is not valid: it is empty"),
])
def test_usage_errors_exit_2(args, words):
    run = client(*args)
    assert run.returncode == 2, (args, show(run))
    assert words in run.stderr, (args, show(run))
    assert run.stdout == "", (args, show(run))


def test_a_token_is_sent_only_with_token_file(host):
    token = "client-t0ken-a1b2c3d4e5f6a7b8"
    token_file = os.path.join(host.base, "client-token")
    wrong_file = os.path.join(host.base, "client-token-wrong")
    for path, text in ((token_file, token), (wrong_file, token[:-1] + "x")):
        with open(path, "w") as f:
            f.write(text + "\n")
        os.chmod(path, 0o600)
    try:
        host.restart_manager(BACKEND_AI_TOKEN_FILE=token_file)
        for args in (("status",), ("version",), ("stop",)):
            run = client(*args, host=on(host))
            assert run.returncode == 1, (args, show(run))
            assert "HTTP 401: missing or wrong bearer token" in run.stderr, (args, show(run))
            assert run.stdout == ""
        assert host.is_active() == "active"  # the stop without a token did nothing
        run = client("status", "--token-file", wrong_file, host=on(host))
        assert run.returncode == 1 and "HTTP 401" in run.stderr, show(run)
        run = client("status", "--token-file", token_file, host=on(host))
        assert run.returncode == 0, show(run)
        assert run.stdout.startswith(f"{host.SERVICE}: active (running)"), show(run)
        run = client("version", "--json", host=on(host),
                     env={"BACKEND_AI_TOKEN_FILE": token_file})  # the variable as default
        assert run.returncode == 0, show(run)
        assert json.loads(run.stdout)["version"] == installed_version(host)
    finally:
        host.restart_manager()
    assert client("status", host=on(host)).returncode == 0


# ---------------------------------------------------------------------------------------------
# --json
# ---------------------------------------------------------------------------------------------

def test_json_prints_one_document(host):
    version = installed_version(host)
    run = client("status", "--json", host=on(host))
    assert run.returncode == 0, show(run)
    status = json.loads(run.stdout)
    assert status["running"] is True and status["service"] == host.SERVICE
    assert status["version"] == version and status["main_pid"] == host.main_pid()

    run = client("version", "--json", host=on(host))
    assert run.returncode == 0, show(run)
    assert json.loads(run.stdout) == {"version": version, "name": "@proxmox-ai-control/hub"}

    run = client("logs", "-n", "5", "--json", host=on(host))
    assert run.returncode == 0, show(run)
    logs = json.loads(run.stdout)
    assert logs["service"] == host.SERVICE and logs["lines"] == 5
    assert 1 <= len(logs["logs"].splitlines()) <= 5


def test_update_json_prints_the_final_record(host):
    target = "2.0.12" if installed_version(host) == "2.0.11" else "2.0.11"
    run = client("update", target, "--json", host=on(host))
    assert run.returncode == 0, show(run)
    record = json.loads(run.stdout)  # the whole stdout: no step lines, no bar
    assert record["state"] == "succeeded" and record["version"] == target, record
    assert record["action"] == "update" and record["error"] is None
    steps = [entry["state"] for entry in record["log"]]
    for state in ("downloading", "verifying", "swapping", "restarting", "checking",
                  "succeeded"):
        assert state in steps, steps
    assert record == host.api("GET", "/update")[1]
    host.assert_installed(target)
    assert host.service_info()["version"] == target

    run = client("update", "9.9.9", "--json", host=on(host))
    assert run.returncode == 1, show(run)
    record = json.loads(run.stdout)
    assert record["state"] == "failed" and "404" in record["error"], record
    assert installed_version(host) == target


# ---------------------------------------------------------------------------------------------
# update, rollback: exit statuses and the step lines
# ---------------------------------------------------------------------------------------------

def test_update_to_a_version_the_nas_lacks_exits_1(host):
    before, pid = installed_version(host), host.main_pid()
    run = client("update", "9.9.8", host=on(host))
    assert run.returncode == 1, show(run)
    lines = run.stdout.splitlines()
    assert lines[0] == "Hub update to version 9.9.8 started", show(run)
    assert lines[-1].startswith("update failed: the NAS has no release 9.9.8") and \
        "404" in lines[-1], show(run)
    assert [s for _, s, _ in stamped(run.stdout)][-1] == "failed", show(run)
    assert installed_version(host) == before and host.main_pid() == pid


def test_update_to_a_release_that_crashes_at_start_is_rolled_back_and_exits_1(host):
    before = installed_version(host)
    run = client("update", "2.0.13", host=on(host))
    assert run.returncode == 1, show(run)
    last = run.stdout.splitlines()[-1]
    assert last.startswith("update rolled_back: "), show(run)
    assert "rolled_back" in [s for _, s, _ in stamped(run.stdout)], show(run)
    assert host.is_active() == "active" and host.service_info()["version"] == before
    run = client("version", host=on(host))
    assert run.returncode == 0 and run.stdout.startswith(f"{before} "), show(run)
    host.assert_installed(before)


def test_update_no_wait_then_rollback_follows_to_the_end(host):
    before = installed_version(host)
    target = "2.0.12" if before != "2.0.12" else "2.0.11"
    run = client("update", target, "--no-wait", host=on(host))
    assert run.returncode == 0, show(run)
    assert run.stdout == f"Hub update to version {target} started\n", show(run)
    assert host.wait_update()["state"] == "succeeded"
    assert installed_version(host) == target

    run = client("rollback", host=on(host))
    assert run.returncode == 0, show(run)
    lines = run.stdout.splitlines()
    assert lines[0] == f"Hub rollback to version {before} started", show(run)
    assert lines[-1] == f"rollback succeeded: version {before} is running", show(run)
    states = [s for _, s, _ in stamped(run.stdout)]
    assert states[-1] == "succeeded" and "restarting" in states, show(run)
    assert installed_version(host) == before and host.service_info()["version"] == before


def test_update_progress_on_a_pipe_has_step_lines_and_no_control_characters(host):
    version = SLOW_VERSIONS[0]
    run = client("update", version, host=on(host))
    assert run.returncode == 0, show(run)
    assert not CONTROL.search(run.stdout), repr(run.stdout)
    lines = run.stdout.splitlines()
    assert lines[0] == f"Hub update to version {version} started", show(run)
    assert lines[-1] == f"update succeeded: version {version} is running", show(run)
    steps = stamped(run.stdout)
    assert len(steps) == len(lines) - 2, show(run)  # every other line is a step line
    states = [s for _, s, _ in steps]
    for state in ("downloading", "verifying", "swapping", "restarting", "checking",
                  "succeeded"):
        assert state in states, show(run)
    assert [t for t, _, _ in steps] == sorted(t for t, _, _ in steps), show(run)
    # The download lasted several of the client's polls (0.2 s): on a terminal it drew a bar.
    began = next(t for t, s, _ in steps if s == "downloading")
    verified = next(t for t, s, _ in steps if s == "verifying")
    assert verified - began >= 0.6, show(run)
    host.assert_installed(version)


def run_on_terminal(argv, timeout=90):
    """Run argv with its stdout on a pseudo-terminal (raw: no \\n -> \\r\\n); returns (exit
    status, bytes written to the terminal, stderr)."""
    master, slave = pty.openpty()
    tty.setraw(slave)
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=slave,
                                stderr=subprocess.PIPE, env=client_env())
    finally:
        os.close(slave)
    out = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if not ready:
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            out += data
        code = proc.wait(timeout=max(1, deadline - time.monotonic()))
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
    return code, bytes(out), proc.stderr.read().decode()


def test_update_progress_on_a_terminal_draws_a_bar(host):
    version = SLOW_VERSIONS[1]
    code, out, err = run_on_terminal([sys.executable, MANAGER, "update", version,
                                      "--host", on(host)])
    text = out.decode()
    assert code == 0, (code, text, err)
    frames = re.findall(r"\r\x1b\[K  downloading \[([#.]{30})\] +(\d+)%  [\d.]+ of [\d.]+ MB, "
                        r"\d+ files", text)
    assert len(frames) >= 2, repr(text)
    percents = [int(p) for _, p in frames]
    assert percents == sorted(percents) and percents[0] < percents[-1], percents
    for bar, percent in frames:  # the bar's length follows the percentage
        assert re.fullmatch(r"#*\.*", bar) and abs(bar.count("#") - 30 * int(percent) // 100) \
            <= 1, frames
    # The bar is cleared before the next step line is printed, and the steps are all there.
    assert re.search(r"\r\x1b\[K\[ *\d+\.\ds\] verifying: ", text), repr(text)
    plain = re.sub(r"\r\x1b\[K(  downloading [^\r\n]*)?", "", text)
    assert not CONTROL.search(plain), repr(plain)
    states = [s for _, s, _ in stamped(plain)]
    for state in ("downloading", "verifying", "restarting", "checking", "succeeded"):
        assert state in states, repr(text)
    assert plain.splitlines()[-1] == f"update succeeded: version {version} is running", \
        repr(text)
    host.assert_installed(version)


# ---------------------------------------------------------------------------------------------
# A hub and its agents: `agents`, and `update` with a rollout
# ---------------------------------------------------------------------------------------------

def test_agents_prints_a_table_of_every_agent(fleet):
    hub, agents = fleet
    versions = agent_versions(agents)
    hub_version = installed_version(hub)
    run = client("agents", host=on(hub))
    assert run.returncode == 0, show(run)
    lines = run.stdout.splitlines()
    assert re.fullmatch(r"AGENT +REACHABLE +STATE +VERSION +SINCE +UPDATE +RTT +MANAGER",
                        lines[0]), show(run)
    rows = [re.fullmatch(r"(\S+) +(yes|no) +(\S+) +(\S+) +(\S+) +(.+?) +(\d+ ms) +(\S+)", line)
            for line in lines[1:1 + len(AGENTS)]]
    assert all(rows), show(run)
    assert [r.group(1) for r in rows] == AGENTS, show(run)
    assert [r.group(2, 3) for r in rows] == [("yes", "active")] * len(AGENTS), show(run)
    assert [r.group(4) for r in rows] == versions, show(run)
    assert all(r.group(5).endswith("Z") for r in rows), show(run)
    manager = bam_version()
    assert [r.group(8) for r in rows] == [manager] * len(AGENTS), show(run)
    counts = ", ".join(f"{v}: {versions.count(v)}" for v in sorted(set(versions)))
    skew = ", ".join(a for a, v in zip(AGENTS, versions) if v != hub_version) or "none"
    assert lines[1 + len(AGENTS):] == [
        f"{len(AGENTS)} agents, {len(AGENTS)} reachable, {len(AGENTS)} running; versions "
        f"{counts}; hub {hub_version}; not on the hub's version: {skew}",
        f"managers {manager}: {len(AGENTS)}; hub's {manager}; not on the hub's manager: none"], \
        show(run)

    run = client("agents", "--json", host=on(hub))
    assert run.returncode == 0, show(run)
    body = json.loads(run.stdout)
    assert [e["agent"] for e in body["agents"]] == AGENTS
    assert [e["version"] for e in body["agents"]] == versions
    assert body["summary"]["total"] == len(AGENTS) and body["summary"]["reachable"] == 3


def test_update_on_a_hub_prints_each_agents_outcome(fleet):
    hub, agents = fleet
    version = "2.0.11"
    hub.publish(version)
    agents[0].publish(version)  # one agent release on the NAS serves them all
    before = agent_versions(agents)
    run = client("update", version, host=on(hub))
    assert run.returncode == 0, show(run)
    lines = run.stdout.splitlines()
    assert lines[0].startswith(f"Hub update to version {version} started"), show(run)
    assert f"update succeeded: version {version} is running" in lines, show(run)
    outcomes = [AGENT_LINE.match(line) for line in lines if AGENT_LINE.match(line)]
    assert [m.group(1, 2, 3, 4, 5) for m in outcomes][:1] == [
        (AGENTS[0], "1", "succeeded", before[0], version)], show(run)  # the canary first
    assert sorted(m.group(1, 2, 3, 4, 5) for m in outcomes) == sorted(
        (a, str(b), "succeeded", v, version) for a, b, v in zip(AGENTS, (1, 2, 2), before)), \
        show(run)
    assert lines[-1] == "rollout succeeded: 3 agents: 3 succeeded", show(run)
    assert lines.index(f"update succeeded: version {version} is running") < \
        lines.index(outcomes[0].group(0)), show(run)
    for m in outcomes:  # each agent's start is shown before its outcome
        started = [i for i, line in enumerate(lines)
                   if line.endswith(f"agent {m.group(1)} (batch {m.group(2)}): updating")]
        assert len(started) == 1 and started[0] < lines.index(m.group(0)), show(run)
    hub.assert_installed(version)
    for agent in agents:
        agent.assert_installed(version)
        assert agent.service_info()["version"] == version

    run = client("agents", host=on(hub))
    assert run.returncode == 0, show(run)
    assert run.stdout.count(f"succeeded {version}") == len(AGENTS), show(run)
    assert run.stdout.splitlines()[-2].endswith(f"hub {version}; not on the hub's version: none")


def test_update_json_on_a_hub_holds_the_rollout(fleet):
    hub, agents = fleet
    version = "2.0.12"
    hub.publish(version)
    agents[0].publish(version)
    before = agent_versions(agents)
    run = client("update", version, "--json", host=on(hub))
    assert run.returncode == 0, show(run)
    record = json.loads(run.stdout)
    assert record["state"] == "succeeded" and record["version"] == version, record
    rollout = record["agents"]
    assert rollout["state"] == "succeeded" and rollout["version"] == version, rollout
    assert [e["agent"] for e in rollout["agents"]] == AGENTS
    assert [e["state"] for e in rollout["agents"]] == ["succeeded"] * 3
    assert [e["from_version"] for e in rollout["agents"]] == before
    assert agent_versions(agents) == [version] * 3 and installed_version(hub) == version


def test_a_halted_rollout_exits_1(fleet):
    hub, agents = fleet
    version = "2.0.14"
    agents[0].publish(version, crash=True)
    before = agent_versions(agents)
    run = client("update", version, "--target", "agents", host=on(hub))
    assert run.returncode == 1, show(run)
    lines = run.stdout.splitlines()
    assert lines[0] == f"Agents update to version {version} started", show(run)
    outcomes = [AGENT_LINE.match(line) for line in lines if AGENT_LINE.match(line)]
    assert [m.group(1, 2, 3, 4, 5) for m in outcomes] == [
        (AGENTS[0], "1", "rolled_back", before[0], version)], show(run)
    assert lines[-1].startswith("rollout halted: 3 agents: 1 rolled_back, 2 waiting; "), \
        show(run)
    assert "--rollout-max-failures 0" in lines[-1], show(run)
    assert agent_versions(agents) == before
    assert all(a.is_active() == "active" for a in agents)


# ---------------------------------------------------------------------------------------------
# pack
# ---------------------------------------------------------------------------------------------

PACKED = "2.1.0"
LONG_NAME = "dist/nested/" + "/".join(["d" * 40] * 3) + "/" + "f" * 120 + ".js"


def node_build(node_hub, dest):
    """The real Node hub's release folder (dist/, package.json, node_modules/ with its .bin
    links) plus: a name over 100 bytes, a link whose target is over 100 bytes, a non-ASCII
    name, an executable, a link inside dist/ and 1.5 MiB of random bytes."""
    build = nodehub.build(node_hub, PACKED, dest, extra={
        LONG_NAME: b"// a long name\n",
        "dist/assets/blob.bin": os.urandom(3 << 19),
        "dist/assets/\u00fcn\u00efc\u00f6d\u00e9-\u540d\u524d.txt": b"utf-8 name\n",
        "dist/bin/run.sh": b"#!/bin/sh\necho run\n",
    })
    os.chmod(os.path.join(build, "dist", "bin", "run.sh"), 0o755)
    os.symlink("code.txt", os.path.join(build, "dist", "code-link"))
    os.symlink(os.path.relpath(LONG_NAME, "dist/assets"),
               os.path.join(build, "dist", "assets", "long-link"))
    assert len(os.readlink(os.path.join(build, "dist", "assets", "long-link"))) > 100
    return build


def test_pack_is_reproducible_gnu_tar_reads_it_and_the_node_hub_runs_from_it(
        node_host, node_hub, work_dir):
    scratch = os.path.join(work_dir, "client-pack")
    shutil.rmtree(scratch, ignore_errors=True)
    build = node_build(node_hub, os.path.join(scratch, "build"))
    name = f"hub-{PACKED}.tar.gz"

    run = client("pack", build, "--kind", "hub", "--out", os.path.join(scratch, "nas1"))
    assert run.returncode == 0, show(run)
    tarball = os.path.join(scratch, "nas1", PACKED, name)
    digest = sha256_of(tarball)
    lines = run.stdout.splitlines()
    assert lines[-2:] == [tarball, f"{tarball}.sha256: {digest}"], show(run)
    assert "checked: the manager's extractor unpacks exactly the build" in lines, show(run)
    with open(f"{tarball}.sha256") as f:
        sums = f.read()
    assert sums == f"{digest}  {name}\n"
    assert sorted(os.listdir(os.path.join(scratch, "nas1"))) == [PACKED]
    assert sorted(os.listdir(os.path.join(scratch, "nas1", PACKED))) == [name, f"{name}.sha256"]

    # A rebuild: every file touched (new times). The same bytes come out.
    for dirpath, dirnames, filenames in os.walk(build):
        for entry in dirnames + filenames:
            os.utime(os.path.join(dirpath, entry), (1.7e9, 1.7e9), follow_symlinks=False)
    run = client("pack", build, "--kind", "hub", "--out", os.path.join(scratch, "nas2"),
                 "--json")
    assert run.returncode == 0, show(run)
    second = os.path.join(scratch, "nas2", PACKED, name)
    assert json.loads(run.stdout) == {"tarball": second, "sha256": digest}, show(run)
    with open(tarball, "rb") as a, open(second, "rb") as b:
        assert hashlib.sha256(a.read()).digest() == hashlib.sha256(b.read()).digest()
    with open(f"{second}.sha256") as f:
        assert f.read() == sums

    # GNU tar lists it (owner root, time 0) and extracts exactly the build.
    listing = subprocess.run([trees.TAR, "-tzvf", tarball, "--utc"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, universal_newlines=True)
    assert listing.returncode == 0 and listing.stderr == "", listing.stderr
    rows = listing.stdout.splitlines()
    assert rows and all(" root/root " in r and " 1970-01-01 00:00 " in r for r in rows), rows[:5]
    assert any(r.endswith(LONG_NAME) for r in rows)
    expected = trees.walk(build)
    assert LONG_NAME in expected and "node_modules/.bin/tsc" in expected
    # The packing manager rides along (pack --no-manager leaves it out).
    assert "dist/manager" not in expected
    expected["dist/manager"] = ("dir",)
    expected["dist/manager/backend_ai_manager.py"] = trees.entry(MANAGER)[:3] + (False,)
    assert expected["dist/bin/run.sh"][3] is True and expected["dist/code.txt"][3] is False
    extracted = trees.gnu_tree(tarball, os.path.join(scratch, "gnu"))
    trees.assert_same(expected, extracted, f"GNU tar's extraction of {tarball}")

    # Served by the NAS, the packed release updates the real Node hub, which runs from it.
    folder = os.path.join(node_host.nas.root, PACKED)
    os.makedirs(folder, exist_ok=True)
    for suffix in ("", ".sha256"):
        shutil.copyfile(tarball + suffix, os.path.join(folder, name + suffix))
    run = client("update", PACKED, "--target", "hub", host=on(node_host))
    assert run.returncode == 0, show(run)
    assert run.stdout.splitlines()[-1] == f"update succeeded: version {PACKED} is running", \
        show(run)
    record = node_host.api("GET", "/update")[1]
    assert record["sha256"] == digest and record["state"] == "succeeded", record
    node_host.assert_installed(PACKED)  # GNU tar's extraction of the packed tarball
    trees.assert_same(expected, trees.installed(node_host.install_dir, expected),
                      f"{node_host.install_dir} (the build itself)")
    info = node_host.service_info()
    assert info == {"name": "@proxmox-ai-control/hub", "version": PACKED,
                    "greeting": "hello from config.json", "code": f"hub code of {PACKED}"}
    assert node_host.is_active() == "active"
    run = client("version", host=on(node_host))
    assert run.stdout == f"{PACKED} @proxmox-ai-control/hub\n", show(run)
    shutil.rmtree(scratch, ignore_errors=True)


def small_build(root, package=None, dist=True):
    """A small hand-made build: package.json (`package`, or a good one), dist/ with a file."""
    os.makedirs(root)
    if package is not False:
        with open(os.path.join(root, "package.json"), "w") as f:
            f.write(package if isinstance(package, str) else json.dumps(
                {"name": "x", "version": "1.2.3"}))
    if dist:
        os.makedirs(os.path.join(root, "dist", "sub"))
        with open(os.path.join(root, "dist", "sub", "index.js"), "w") as f:
            f.write("// code\n")
    return root


def _link(target, where):
    def make(build):
        os.symlink(target, os.path.join(build, where))
    return make


def _fifo(build):
    os.mkfifo(os.path.join(build, "dist", "pipe"))


def _dist_link(build):
    os.makedirs(os.path.join(build, "elsewhere"))
    os.symlink("elsewhere", os.path.join(build, "dist"))


@pytest.mark.parametrize("case, package, dist, change, words", [
    ("no dist", None, False, None, "dist/ is missing"),
    ("dist is a link", None, False, _dist_link, "dist/ is missing"),
    ("version ../x", json.dumps({"name": "x", "version": "../x"}), True, None,
     "not a plain version"),
    ("no version", json.dumps({"name": "x"}), True, None, 'no "version" string'),
    ("version a number", json.dumps({"version": 3}), True, None, 'no "version" string'),
    ("no package.json", False, True, None, "does not exist"),
    ("package.json not JSON", "{nope", True, None, "not valid JSON"),
    ("link to /etc/passwd", None, True, _link("/etc/passwd", "dist/passwd"), "outside the build"),
    ("link to ../../outside", None, True, _link("../../outside", "dist/up"),
     "outside the build"),
    ("link to .. from the top", None, True, _link("..", "parent"), "outside the build"),
    ("a fifo", None, True, _fifo, "not a file, folder or symlink"),
])
def test_pack_refuses_what_a_release_cannot_be(tmp_path, case, package, dist, change, words):
    build = small_build(str(tmp_path / "build"), package, dist)
    if change:
        change(build)
    out = str(tmp_path / "out")
    os.makedirs(out)
    run = client("pack", build, "--kind", "agent", "--out", out)
    assert run.returncode == 1, (case, show(run))
    assert run.stderr.startswith("backend_ai_manager.py pack: error: ") and words in run.stderr, \
        (case, show(run))
    assert run.stderr.count("\n") == 1 and "Traceback" not in run.stderr, (case, show(run))
    assert os.listdir(out) == [], (case, os.listdir(out))


def test_pack_of_a_good_small_build_with_kind_agent(tmp_path):
    """The control case of the refusals: the same small build, unchanged, is packed."""
    build = small_build(str(tmp_path / "build"))
    out = str(tmp_path / "out")
    run = client("pack", build, "--kind", "agent", "--out", out, "--no-manager")
    assert run.returncode == 0, show(run)
    tarball = os.path.join(out, "1.2.3", "agent-1.2.3.tar.gz")
    assert sorted(os.listdir(os.path.join(out, "1.2.3"))) == [
        "agent-1.2.3.tar.gz", "agent-1.2.3.tar.gz.sha256"]
    assert trees.gnu_tree(tarball, str(tmp_path / "gnu")) == trees.walk(build)


def test_pack_carries_this_manager_unless_no_manager(tmp_path):
    build = tmp_path / "build"
    (build / "dist").mkdir(parents=True)
    (build / "dist" / "app.js").write_text("app")
    (build / "package.json").write_text('{"name": "x", "version": "3.1.4"}')
    listings = {}
    for flag in ((), ("--no-manager",)):
        out = tmp_path / ("nas" + "".join(flag))
        run = client("pack", str(build), "--kind", "agent", "--out", str(out), *flag)
        assert run.returncode == 0, show(run)
        tarball = out / "3.1.4" / "agent-3.1.4.tar.gz"
        listings[flag] = subprocess.run([trees.TAR, "-tzf", str(tarball)], check=True,
                                        stdout=subprocess.PIPE, text=True).stdout.split()
        if not flag:
            assert f"with manager {bam_version()} as dist/manager/backend_ai_manager.py" \
                in run.stdout, show(run)
            got = trees.gnu_tree(str(tarball), str(tmp_path / "gnu"))
            assert got["dist/manager/backend_ai_manager.py"][2] == trees.entry(MANAGER)[2]
    assert listings[()] == ["dist/", "dist/app.js", "dist/manager/",
                            "dist/manager/backend_ai_manager.py", "package.json"]
    assert listings[("--no-manager",)] == ["dist/", "dist/app.js", "package.json"]
    # A build whose dist/manager is not a folder: refused, with the way out named.
    (build / "dist" / "manager").write_text("not a folder")
    run = client("pack", str(build), "--kind", "agent", "--out", str(tmp_path / "bad"))
    assert run.returncode == 1 and "pack --no-manager" in run.stderr, show(run)
    assert not (tmp_path / "bad" / "3.1.4").exists()


def bam_version():
    with open(MANAGER, "rb") as f:
        return re.search(rb'^__version__ = "([^"]+)"', f.read(), re.M).group(1).decode()


def test_pack_sign_writes_a_signature_and_never_leaves_an_old_one(tmp_path):
    build = tmp_path / "build"
    (build / "dist").mkdir(parents=True)
    (build / "dist" / "app.js").write_text("app")
    (build / "package.json").write_text('{"name": "x", "version": "3.1.5"}')
    key = tmp_path / "key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    out = tmp_path / "nas"
    tarball = out / "3.1.5" / "agent-3.1.5.tar.gz"
    # A key that cannot sign: refused, with ssh-keygen's words, and nothing written.
    run = client("pack", str(build), "--kind", "agent", "--out", str(out), "--sign",
                 str(tmp_path / "no-such-key"))
    assert run.returncode == 1 and "ssh-keygen could not sign" in run.stderr, show(run)
    assert not (out / "3.1.5").exists()
    run = client("pack", str(build), "--kind", "agent", "--out", str(out), "--sign", str(key))
    assert run.returncode == 0, show(run)
    allowed = tmp_path / "allowed"
    allowed.write_text(f"me {(tmp_path / 'key.pub').read_text()}")
    with open(f"{tarball}.sha256", "rb") as sums:
        check = subprocess.run(["ssh-keygen", "-Y", "verify", "-f", str(allowed), "-I", "me",
                                "-n", "backend-ai-release", "-s", f"{tarball}.sha256.sig"],
                               stdin=sums, stdout=subprocess.PIPE, text=True)
    assert check.returncode == 0 and check.stdout.startswith("Good"), check.stdout
    # Packed again without --sign: the old signature goes with the old checksum.
    run = client("pack", str(build), "--kind", "agent", "--out", str(out))
    assert run.returncode == 0, show(run)
    assert sorted(os.listdir(out / "3.1.5")) == ["agent-3.1.5.tar.gz", "agent-3.1.5.tar.gz.sha256"]
