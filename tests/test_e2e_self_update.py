"""The manager updates itself from a release that carries a newer one (dist/manager/), on the
shipped hardened unit in the sandboxed systemd, run from a fixed file as `make install` puts it:
self-test, store, hand-over in place (same MainPID, the listening socket passed on) and a trial
that falls back by itself. Every update's installed tree is compared byte for byte with GNU
tar's extraction of its tarball. Runs under Debian's /usr/bin/python3."""

import json
import os
import shutil
import threading
import time

import pytest

from support import MANAGER, Host, bam, fleet_hosts, http_call, started_hosts

PYTHON = "/usr/bin/python3"
BASE = bam.__version__
TRIAL = 6  # seconds; the manager that dies does so 3 s after it serves


def manager_variant(version, extra=""):
    """This checkout's manager file, declaring `version`, with `extra` code at module level."""
    with open(MANAGER) as f:
        text = f.read()
    old = f'__version__ = "{BASE}"'
    assert text.count(old) == 1
    text = text.replace(old, f'__version__ = "{version}"')
    anchor = "\n# How `serve` runs:"
    assert text.count(anchor) == 1
    return text.replace(anchor, f"\n{extra}\n{anchor}").encode()


DIES_AFTER_3_S = """
_serving = ManagerUpdate.serving


def _serving_then_dying(self):  # a manager that fails 3 s after it starts serving
    _serving(self)
    threading.Timer(3, os._exit, (3,)).start()


ManagerUpdate.serving = _serving_then_dying
"""
DOES_NOT_COMPILE = "def broken(:\n    pass\n"


class Poller(threading.Thread):
    """GET /status every 20 ms, each on a new connection: counts failures and the manager
    versions seen."""

    def __init__(self, host):
        super().__init__(daemon=True)
        self.host, self.stop, self.ok, self.failures, self.seen = host, threading.Event(), 0, [], []

    def run(self):
        while not self.stop.wait(0.02):
            try:
                status, _, body = http_call(self.host.port, "GET", "/status", timeout=20)
            except OSError as e:
                self.failures.append(repr(e))
                continue
            if status != 200:
                self.failures.append(status)
                continue
            self.ok += 1
            if not self.seen or self.seen[-1] != body["manager"]["version"]:
                self.seen.append(body["manager"]["version"])

    def finish(self):
        self.stop.set()
        self.join(30)
        return self


def manager(host):
    return host.api("GET", "/status", headers=getattr(host, "auth", None))[1]["manager"]


def wait_manager_state(host, check, timeout=60):
    """Poll /status until check(manager view) is true (answers missing meanwhile are fine)."""
    deadline = time.monotonic() + timeout
    view = None
    while time.monotonic() < deadline:
        try:
            view = manager(host)
        except OSError:
            view = None
        if view is not None and check(view):
            return view
        time.sleep(0.1)
    log = host.sandbox.run(["journalctl", "-u", host.MANAGER_UNIT, "-n", "40", "--no-pager"])
    raise AssertionError(f"manager state not reached: {view}\n{log.stdout}")


def update(host, version):
    """The service's own update, which must succeed and install exactly the release. (The
    manager may hand over, or be killed by a test's failpoint, right after it: no answer for a
    moment is fine.)"""
    status, answer = host.api("POST", "/update", {"version": version})
    assert status == 200, answer
    deadline = time.monotonic() + 90
    while True:
        try:
            record = host.api("GET", "/update", timeout=5)[1]
        except OSError:
            record = {"state": "no answer"}
        if record["state"] in ("succeeded", "failed", "rolled_back"):
            break
        assert time.monotonic() < deadline, record
        time.sleep(0.05)
    assert record["state"] == "succeeded", record
    host.assert_installed(version)
    return record


def n_restarts(host):
    out = host.sandbox.systemctl("show", host.MANAGER_UNIT, "-p", "NRestarts").stdout
    return int(out.strip().split("=")[1])


def store(host, *parts):
    return os.path.join(host.state_dir, "manager", *parts)


@pytest.fixture(scope="module")
def self_host(sandbox, nas, work_dir):
    if not os.access(PYTHON, os.X_OK):
        pytest.fail(f"{PYTHON} is missing")
    base = os.path.join(work_dir, "self-update")
    host = Host(sandbox, base, nas, python=PYTHON, settle=0.5, name="self",
                env={"BACKEND_AI_MANAGER_TRIAL": str(TRIAL)})
    host.install_base("2.0.10")
    host.start()
    yield host
    host.stop()
    shutil.rmtree(base, ignore_errors=True)


def publish_with(host, version, manager_bytes):
    host.publish(version, extra={"dist/manager/backend_ai_manager.py": manager_bytes})


V1, V2, V3, V4 = (f"{BASE}.{n}" for n in (1, 2, 3, 4))


def test_a_newer_manager_takes_over_in_place_without_a_refused_request(self_host):
    host = self_host
    assert manager(host)["version"] == BASE and manager(host)["state"] == "good"
    newer = manager_variant(V1)
    publish_with(host, "2.0.11", newer)
    pid, restarts = host.manager_pid(), n_restarts(host)
    poller = Poller(host)
    poller.start()
    record = update(host, "2.0.11")
    assert record["manager_update"] == V1
    view = wait_manager_state(host, lambda m: m["version"] == V1 and m["state"] == "good",
                              timeout=TRIAL + 30)
    poller.finish()
    assert host.manager_pid() == pid  # handed over in place: the same process
    assert n_restarts(host) == restarts and host.is_active(host.MANAGER_UNIT) == "active"
    assert poller.failures == [] and poller.ok > 50, (poller.failures, poller.ok)
    assert poller.seen[0] == BASE and poller.seen[-1] == V1, poller.seen
    assert view["previous"] == BASE and view["failed"] == {}
    assert view["self_update"]["version"] == V1 and view["self_update"]["state"] == "good"
    with open(store(host, V1, "backend_ai_manager.py"), "rb") as f:
        assert f.read() == newer
    assert os.readlink(store(host, "current")) == V1
    with open(store(host, BASE, "backend_ai_manager.py"), "rb") as f, open(MANAGER, "rb") as g:
        assert f.read() == g.read()  # the previous version, kept
    assert host.service_info()["version"] == "2.0.11" and host.is_active() == "active"
    # A restart of the unit starts the fixed file, which hands over to the kept newer one.
    assert host.sandbox.systemctl("restart", host.MANAGER_UNIT).returncode == 0
    host.wait_manager()
    view = wait_manager_state(host, lambda m: m["version"] == V1)
    assert view["state"] == "good" and view["previous"] == BASE


def test_a_manager_that_does_not_compile_is_refused(self_host):
    host = self_host
    publish_with(host, "2.0.12", manager_variant(V2, DOES_NOT_COMPILE))
    pid = host.manager_pid()
    update(host, "2.0.12")
    view = wait_manager_state(host, lambda m: (m["self_update"] or {}).get("version") == V2
                              and m["self_update"]["state"] == "refused")
    assert view["version"] == V1 and view["state"] == "good"
    assert "self-test failed" in view["failed"][V2] and "SyntaxError" in view["failed"][V2], view
    assert view["self_update"]["error"] == view["failed"][V2]
    assert host.manager_pid() == pid and not os.path.exists(store(host, V2))
    assert os.readlink(store(host, "current")) == V1


def test_a_manager_that_dies_on_trial_is_reverted_and_marked_failed(self_host):
    host = self_host
    publish_with(host, "2.0.13", manager_variant(V3, DIES_AFTER_3_S))
    update(host, "2.0.13")
    # It takes over, serves, dies 3 s later; systemd starts the fixed file, which settles the
    # trial and hands over to the last good manager.
    view = wait_manager_state(host, lambda m: V3 in m["failed"], timeout=TRIAL + 40)
    view = wait_manager_state(host, lambda m: m["version"] == V1)
    assert view["state"] == "good" and view["self_update"]["state"] == "reverted"
    reason = view["failed"][V3]
    assert reason.startswith(f"stopped during its {TRIAL} s trial (it began serving "), reason
    assert 3 <= int(reason.split("serving ")[1].split(" s")[0]) < TRIAL + 10, reason
    assert os.readlink(store(host, "current")) == V1
    host.assert_installed("2.0.13")
    assert host.service_info()["version"] == "2.0.13"


def test_a_failed_manager_is_not_tried_again(self_host):
    host = self_host
    publish_with(host, "2.0.14", manager_variant(V3, DIES_AFTER_3_S))
    before = manager(host)
    pid = host.manager_pid()
    record = update(host, "2.0.14")
    assert record["manager_update"] is None
    time.sleep(2)
    after = manager(host)
    assert after["self_update"] == before["self_update"] and after["version"] == V1
    assert host.manager_pid() == pid


def test_a_newer_file_copied_by_hand_wins_after_a_restart(self_host):
    host = self_host
    with open(host.manager, "wb") as f:
        f.write(manager_variant(V4))
    assert host.sandbox.systemctl("restart", host.MANAGER_UNIT).returncode == 0
    host.wait_manager()
    view = wait_manager_state(host, lambda m: m["version"] == V4)
    assert view["state"] == "good" and view["previous"] == V1
    older = f"{BASE}.3.5"  # older than V4, and never failed
    publish_with(host, "2.0.15", manager_variant(older))
    assert update(host, "2.0.15")["manager_update"] is None  # never a downgrade
    time.sleep(1)
    assert manager(host)["version"] == V4 and older not in manager(host)["failed"]


# --- kill -9 at each step of a self-update: it always comes back as a good manager -----------

def wait_pid_change(host, pid, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if host.manager_pid() not in (pid, 0):
            return
        time.sleep(0.05)
    raise AssertionError(f"manager {pid} was not killed")


def assert_records_agree(host):
    """A good manager answers, and /status, manager.json and the `current` link say the same."""
    view = wait_manager_state(host, lambda m: m["state"] == "good" and
                              (m["self_update"] or {}).get("state") not in
                              ("testing", "handing over", "trial"), timeout=TRIAL + 40)
    with open(store(host, "manager.json")) as f:
        record = json.load(f)
    assert record["good"] == view["version"] and not record.get("trial"), (record, view)
    assert record["failed"] == view["failed"]
    current = store(host, "current")
    if os.path.lexists(current):
        assert os.path.isfile(store(host, os.readlink(current), "backend_ai_manager.py"))
        assert os.readlink(current) == view["version"], (os.readlink(current), view)
    return view


KILLS = [("manager-stored", "good"), ("manager-tested", "good"),
         ("manager-handover", "good"),  # before the exec: it never ran, so it is tried again
         ("manager-exec", "failed"),  # exec'd: a death before serving is the new version's
         ("on trial", "failed"),
         ("restart on trial", "good")]  # a clean stop is not a failure: tried again


@pytest.mark.parametrize("step, outcome", KILLS)
def test_kill_at_each_step_of_a_self_update(self_host, step, outcome):
    host = self_host
    n = 10 + [k for k, _ in KILLS].index(step)
    version, release = f"{BASE}.{n}", f"2.1.{n}"
    before = manager(host)["version"]
    host.restart_manager(BACKEND_AI_FAILPOINT=step if step.startswith("manager-") else None)
    pid = host.manager_pid()
    publish_with(host, release, manager_variant(version))
    update(host, release)
    if step.endswith("on trial"):
        wait_manager_state(host, lambda m: m["version"] == version and m["state"] == "trial")
        if step == "restart on trial":
            assert host.sandbox.systemctl("restart", host.MANAGER_UNIT).returncode == 0
        else:
            assert host.sandbox.run(["kill", "-9", str(pid)]).returncode == 0
    wait_pid_change(host, pid)
    host.restart_manager(BACKEND_AI_FAILPOINT=None)
    # The end: the new version good (tried again after the kill), or failed and reverted.
    wait_manager_state(host, lambda m: m["version"] == version if outcome == "good"
                       else version in m["failed"], timeout=TRIAL + 40)
    view = assert_records_agree(host)
    if outcome == "good":
        assert view["version"] == version and version not in view["failed"], view
    else:
        assert view["version"] == before and version in view["failed"], view
        words = "did not start serving" if step == "manager-exec" else "trial"
        assert words in view["failed"][version], view
    host.assert_installed(release)
    assert host.service_info()["version"] == release



def test_a_kept_manager_that_dies_at_start_is_failed_and_the_unit_file_serves(self_host):
    """A kept version that passed its trial once but no longer starts (a Python upgrade broke
    it, its file was damaged): the start point's hand-over to it fails once, not forever."""
    host = self_host
    good = manager(host)["version"]
    broken = f"{BASE}.90"
    os.makedirs(store(host, broken))
    with open(store(host, broken, "backend_ai_manager.py"), "wb") as f:
        f.write(manager_variant(broken, "raise SystemExit(3)"))
    os.symlink(broken, store(host, "current.new"))
    os.replace(store(host, "current.new"), store(host, "current"))
    # This start fails (the kept manager exits before READY); systemd starts the unit again.
    assert host.sandbox.systemctl("restart", host.MANAGER_UNIT).returncode != 0
    view = wait_manager_state(host, lambda m: broken in m["failed"], timeout=40)
    assert view["failed"][broken] == "it stopped before it served, started as the kept manager"
    assert view["version"] == good and view["state"] == "good", view
    assert os.readlink(store(host, "current")) == good
    assert host.sandbox.systemctl("restart", host.MANAGER_UNIT).returncode == 0
    host.wait_manager()
    assert manager(host)["version"] == good  # and it stays so

# --- a hub and two agents: the rollout carries the agents' managers --------------------------
TOKEN = "self-update-token-0123456789"
AGENTS = ["127.0.6.1:3081", "127.0.6.2:3081"]


@pytest.fixture(scope="module")
def fleet_self(sandbox, nas, work_dir):
    base = os.path.join(work_dir, "self-update-fleet")
    os.makedirs(base)
    token = os.path.join(base, "token")
    with open(token, "w") as f:
        f.write(TOKEN + "\n")
    hub, agents, _ = fleet_hosts(
        sandbox, base, nas, AGENTS, token, {"BACKEND_AI_ROLLOUT_BATCHES": "1,100%",
                                            "BACKEND_AI_ROLLOUT_AGENT_TIMEOUT": "120"},
        agent_name=lambda n: f"self{n}", python=PYTHON, settle=0.5)
    for host in agents + [hub]:
        host.env["BACKEND_AI_MANAGER_TRIAL"] = "4"
    for agent in agents:
        agent.auth = {"Authorization": f"Bearer {TOKEN}"}
    try:
        with started_hosts(agents + [hub]):
            yield hub, agents
    finally:
        shutil.rmtree(base, ignore_errors=True)


def roll(hub, version):
    status, answer = hub.api("POST", "/update", {"version": version})
    assert status == 200, answer
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        record = hub.api("GET", "/update")[1]
        rollout = record.get("agents") or {}
        if record["state"] not in bam.WORKING_STATES and rollout.get("state") not in (
                "pending", "rolling"):
            return record
        time.sleep(0.2)
    raise AssertionError(f"rollout still running: {record}")


def test_one_rollout_brings_the_agents_services_and_managers_to_the_new_versions(fleet_self):
    hub, agents = fleet_self
    newer = f"{BASE}.20"
    for host in [hub] + agents[:1]:  # one agent release serves both agents (same NAS)
        publish_with(host, "2.2.0", manager_variant(newer))
    record = roll(hub, "2.2.0")
    assert record["state"] == "succeeded", record
    assert record["agents"]["state"] == "succeeded", record["agents"]
    for entry in record["agents"]["agents"]:
        assert entry["state"] == "succeeded", entry
        assert newer in entry["step"], entry  # it waited for the agent's manager
    for agent in agents:
        agent.assert_installed("2.2.0")
        view = manager(agent)
        assert view["version"] == newer and view["state"] == "good", view
    hub.assert_installed("2.2.0")
    # The hub takes its own newer manager after the rollout.
    wait_manager_state(hub, lambda m: m["version"] == newer and m["state"] == "good")
    status, body = hub.api("GET", "/agents")
    assert status == 200, body
    assert [e["manager"] for e in body["agents"]] == [newer, newer], body
    assert body["summary"]["manager_versions"] == {newer: 2}
    assert body["summary"]["hub_manager"] == newer and body["summary"]["manager_skew"] == []


def test_an_agent_manager_dying_on_trial_is_manager_failed_and_halts_the_rollout(fleet_self):
    hub, agents = fleet_self
    good, dying = f"{BASE}.20", f"{BASE}.21"
    publish_with(hub, "2.2.1", manager_variant(good))  # the hub's release: no newer manager
    publish_with(agents[0], "2.2.1", manager_variant(dying, DIES_AFTER_3_S))
    record = roll(hub, "2.2.1")
    rollout = record["agents"]
    assert rollout["state"] == "halted", rollout
    canary, second = rollout["agents"]
    assert canary["state"] == "manager_failed", canary
    assert f"its manager {dying} did not take: stopped during its 4 s trial" in canary["error"]
    assert second["state"] == "waiting" and not second.get("sent"), second  # never sent
    agents[0].assert_installed("2.2.1")  # the service's own update stands
    agents[1].assert_installed("2.2.0")
    view = wait_manager_state(agents[0], lambda m: m["version"] == good)
    assert dying in view["failed"] and view["state"] == "good", view
