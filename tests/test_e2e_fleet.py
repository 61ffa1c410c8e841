"""End to end: the hub's view of a real fleet, and rollouts to it. Five agent managers, each installed from
systemd/ai-agent-manager.service into the systemd sandbox, each bound to port 3081 at its own
address (127.0.1.1 to 127.0.1.5) and controlling its own unit running the real Node app, each
requiring a bearer token; and a hub manager whose --agents list is a file. Runs the managers
under Debian's /usr/bin/python3."""

import os
import shutil
import socket
import threading
import time

import pytest

from support import bam, fleet_hosts, http_call, started_hosts

PYTHON = "/usr/bin/python3"
TOKEN = "fleet-token-0123456789abcdef"
AGENTS = [f"127.0.1.{n}:3081" for n in range(1, 6)]


@pytest.fixture(scope="module")
def fleet(sandbox, nas, work_dir, node_hub):
    base = os.path.join(work_dir, "fleet")
    os.makedirs(base)
    token = os.path.join(base, "token")
    with open(token, "w") as f:
        f.write(TOKEN + "\n")
    hub, agents, listed = fleet_hosts(
        sandbox, base, nas, AGENTS, token, {
            "BACKEND_AI_ROLLOUT_BATCHES": "1,2,100%", "BACKEND_AI_ROLLOUT_PARALLEL": "2",
            "BACKEND_AI_ROLLOUT_AGENT_TIMEOUT": "120"},
        agent_name=str, python=PYTHON, settle=0.5, node=node_hub)
    try:
        with started_hosts(agents + [hub]):
            yield hub, agents, listed
    finally:
        shutil.rmtree(base, ignore_errors=True)


def overview(hub):
    started = time.monotonic()
    status, body = hub.api("GET", "/agents")
    assert status == 200, body
    return body, time.monotonic() - started


def test_the_hub_sees_every_agent(fleet):
    hub, agents, _ = fleet
    body, took = overview(hub)
    assert [e["agent"] for e in body["agents"]] == AGENTS
    for entry, host in zip(body["agents"], agents):
        assert entry["reachable"] and entry["running"] is True and entry["error"] is None, entry
        assert entry["active_state"] == "active" and entry["version"] == "2.0.10"
        assert entry["update"]["state"] == "idle" and entry["rtt_ms"] < 2000
        assert host.service_info()["version"] == "2.0.10"  # the agent's own service, really
    assert body["summary"] == {"total": 5, "reachable": 5, "running": 5,
                               "versions": {"2.0.10": 5}, "hub_version": "2.0.10", "skew": [],
                               "manager_versions": {bam.__version__: 5},
                               "hub_manager": bam.__version__, "manager_skew": []}
    assert [e["manager"] for e in body["agents"]] == [bam.__version__] * 5
    print(f"\nGET /agents over {len(AGENTS)} real agents: {took * 1000:.0f} ms")


def test_agents_require_the_token_the_hub_sends(fleet):
    _, agents, _ = fleet
    status, _, body = http_call(3081, "GET", "/status", host=agents[0].address)
    assert status == 401, body
    status, _, body = http_call(3081, "GET", "/status", host=agents[0].address,
                                headers={"Authorization": f"Bearer {TOKEN}"})
    assert status == 200 and body["version"] == "2.0.10"


def test_an_updated_agent_shows_as_skew(fleet):
    hub, agents, _ = fleet
    agent = agents[2]
    agent.publish("2.0.11")
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert agent.api("POST", "/update", {"version": "2.0.11"}, headers=auth)[0] == 200
    deadline = time.monotonic() + 60
    while agent.api("GET", "/update", headers=auth)[1]["state"] not in (
            "succeeded", "failed", "rolled_back") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert agent.api("GET", "/update", headers=auth)[1]["state"] == "succeeded"
    agent.assert_installed("2.0.11")  # the agent release, byte for byte
    body, _ = overview(hub)
    assert body["summary"]["versions"] == {"2.0.10": 4, "2.0.11": 1}
    assert body["summary"]["skew"] == [AGENTS[2]]
    assert body["agents"][2]["update"] == {"state": "succeeded", "version": "2.0.11",
                                           "error": None}


def test_a_refusing_and_a_silent_agent_do_not_hold_the_answer(fleet):
    hub, agents, listed = fleet
    silent = socket.socket()
    silent.bind(("127.0.1.6", 3081))
    silent.listen(4)  # the kernel accepts; nobody ever answers
    stop = threading.Event()
    hub.sandbox.systemctl("stop", agents[4].MANAGER_UNIT)
    try:
        with open(listed, "a") as f:
            f.write("127.0.1.6  # accepts, never answers\n")
        body, took = overview(hub)
        assert took < 5.5, f"GET /agents took {took:.2f} s with one agent silent"
        by_agent = {e["agent"]: e for e in body["agents"]}
        refused, quiet = by_agent[AGENTS[4]], by_agent["127.0.1.6:3081"]
        assert not refused["reachable"] and "refused" in refused["error"], refused
        assert not quiet["reachable"] and "no answer within 5 s" in quiet["error"], quiet
        assert body["summary"]["total"] == 6 and body["summary"]["reachable"] == 4
        print(f"\nGET /agents with one agent refusing and one silent: {took:.2f} s")
    finally:
        stop.set()
        silent.close()
        with open(listed, "w") as f:
            f.write("\n".join(AGENTS) + "\n")
        assert hub.sandbox.systemctl("start", agents[4].MANAGER_UNIT).returncode == 0


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def wait_rollout(hub, timeout=180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            record = hub.api("GET", "/update", timeout=5)[1]
        except OSError:  # the hub's manager is restarting
            time.sleep(0.2)
            continue
        agents = record.get("agents") or {}
        if record["state"] not in ("downloading", "verifying", "swapping", "restarting",
                                   "checking") and agents.get("state") not in (
                                       "pending", "rolling"):
            return record
        time.sleep(0.2)
    raise AssertionError(f"rollout not over after {timeout} s: {record}")


def versions(agents):
    return [a.api("GET", "/version", headers=AUTH)[1]["version"] for a in agents]


def test_the_hub_updates_itself_then_its_agents_canary_first(fleet):
    hub, agents, _ = fleet
    hub.publish("2.0.12")
    for agent in agents[:1]:
        agent.publish("2.0.12")  # one agent release serves them all (one NAS)
    before = versions(agents)
    status, body = hub.api("POST", "/update", {"version": "2.0.12"})
    assert status == 200 and body["message"] == "Hub update to version 2.0.12 started"
    record = wait_rollout(hub)
    assert record["state"] == "succeeded", record
    hub.assert_installed("2.0.12")
    rollout = record["agents"]
    assert rollout["state"] == "succeeded", rollout
    entries = rollout["agents"]
    assert [e["batch"] for e in entries] == [1, 2, 2, 3, 3]
    assert [e["state"] for e in entries] == ["succeeded"] * 5
    assert [e["from_version"] for e in entries] == before
    canary = entries[0]
    assert all(canary["finished_at"] <= e["started_at"] for e in entries[1:])  # alone, first
    for agent in agents:
        agent.assert_installed("2.0.12")  # each agent's tree, byte for byte
        assert agent.service_info()["version"] == "2.0.12"
    assert hub.service_info()["version"] == "2.0.12"


def post_update_counts(agents):
    """How many `POST /update` lines each agent's manager has logged, in its whole journal.
    (Not --after-cursor with -u: journalctl 252 skips, after a cursor, an entry that came in the
    same read as the one before it, with the same timestamp: an agent's access line and its
    update's first line do.)"""
    counts = []
    for agent in agents:
        out = agent.sandbox.run(["journalctl", "-u", agent.MANAGER_UNIT, "-o", "cat",
                                 "--no-pager"]).stdout
        counts.append(sum('"POST /update"' in line for line in out.splitlines()))
    return counts


def wait_mid_update(hub, timeout=60):
    """The agents the hub is updating, once the canary has succeeded and others are updating."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rollout = hub.api("GET", "/update")[1]["agents"]
        updating = [e["agent"] for e in rollout["agents"] if e["state"] == "updating"]
        if rollout["agents"][0]["state"] == "succeeded" and updating:
            return updating
        time.sleep(0.02)
    raise AssertionError("never saw agents mid-update after the canary")


def test_a_hub_killed_mid_rollout_goes_on_and_sends_each_agent_one_update(fleet):
    hub, agents, _ = fleet
    agents[0].publish("2.0.13")
    before = post_update_counts(agents)
    assert hub.api("POST", "/update", {"version": "2.0.13", "target": "agents"})[0] == 200
    mid_update = wait_mid_update(hub)  # then kill it
    pid = hub.manager_pid()
    hub.sandbox.systemctl("kill", "-s", "KILL", hub.MANAGER_UNIT)
    record = wait_rollout(hub)
    assert hub.manager_pid() != pid, "the hub's manager was not killed"
    rollout = record["agents"]
    assert rollout["state"] == "succeeded", rollout
    assert [e["state"] for e in rollout["agents"]] == ["succeeded"] * 5
    assert [n - b for n, b in zip(post_update_counts(agents), before)] == [1] * 5
    print(f"\nhub killed while {mid_update} were mid-update; each agent got one POST /update")
    for agent in agents:
        agent.assert_installed("2.0.13")


def test_a_broken_release_stops_at_the_canary(fleet):
    hub, agents, _ = fleet
    agents[0].publish("2.0.14", crash=True)
    assert hub.api("POST", "/update", {"version": "2.0.14", "target": "agents"})[0] == 200
    rollout = wait_rollout(hub)["agents"]
    assert rollout["state"] == "halted" and "1 agents failed" in rollout["error"], rollout
    canary = rollout["agents"][0]
    assert canary["state"] == "rolled_back" and canary["agent"] == AGENTS[0], canary
    assert "ai-agent-1.service" in canary["error"], canary
    assert [e["state"] for e in rollout["agents"][1:]] == ["waiting"] * 4
    assert versions(agents) == ["2.0.13"] * 5  # the canary rolled itself back; the rest untouched
    for agent in agents:
        agent.assert_installed("2.0.13")
    # The release is fixed (published again) and the rollout resumed with target agents.
    agents[0].publish("2.0.14")
    assert hub.api("POST", "/update", {"version": "2.0.14", "target": "agents"})[0] == 200
    rollout = wait_rollout(hub)["agents"]
    assert rollout["state"] == "succeeded", rollout
    for agent in agents:
        agent.assert_installed("2.0.14")


def test_a_hub_killed_during_its_own_update_touches_no_agent(fleet):
    hub, agents, _ = fleet
    hub.publish("2.0.15")
    agents[0].publish("2.0.15")
    before = post_update_counts(agents)
    assert hub.api("POST", "/update", {"version": "2.0.15"})[0] == 200
    deadline, seen = time.monotonic() + 30, None
    while time.monotonic() < deadline and seen is None:
        record = hub.api("GET", "/update")[1]
        if record["state"] in ("downloading", "verifying", "swapping") and \
                record["agents"]["state"] == "pending":
            seen = record["state"]
        time.sleep(0.01)
    assert seen, "never saw the hub's own update running with the rollout pending"
    hub.sandbox.systemctl("kill", "-s", "KILL", hub.MANAGER_UNIT)
    record = wait_rollout(hub)
    assert record["state"] in ("failed", "rolled_back") and "manager stopped" in record["error"]
    assert record["agents"]["state"] == "halted", record["agents"]
    assert post_update_counts(agents) == before
    print(f"\nhub killed during its own update ({seen}): rollout halted, no agent touched")


def test_a_second_hub_serve_mid_rollout_changes_nothing(fleet):
    """An operator runs `serve` by hand on the hub while it rolls out (same port, another
    port): it exits at once on the state dir's lock, without recovery or a resumed rollout,
    so no agent gets a second POST /update."""
    hub, agents, _ = fleet
    agents[0].publish("2.0.16")
    before = post_update_counts(agents)
    pid = hub.manager_pid()
    assert hub.api("POST", "/update", {"version": "2.0.16", "target": "agents"})[0] == 200
    mid_update = wait_mid_update(hub)
    for env in ({}, {"BACKEND_AI_PORT": str(hub.port + 1)}):
        code, took, stderr = hub.serve_by_hand(**env)
        assert code == 1 and len(stderr.strip().splitlines()) == 1, stderr
        assert f"another manager (PID {pid}) holds the lock {hub.state_dir}/lock" in stderr
    record = wait_rollout(hub)
    assert hub.manager_pid() == pid
    assert record["agents"]["state"] == "succeeded", record["agents"]
    assert [n - b for n, b in zip(post_update_counts(agents), before)] == [1] * 5
    print(f"\ntwo hand-run serves while {mid_update} were mid-update: each exited 1 at once; "
          "each agent got one POST /update")
    for agent in agents:
        agent.assert_installed("2.0.16")


# --- the rollout's bookkeeping under faults (real agent managers) ---------------------------

class listed_as:
    """The hub's agents file holds `text` inside the block, and its old content after."""

    def __init__(self, listed, text):
        self.listed, self.text = listed, text

    def __enter__(self):
        with open(self.listed) as f:
            self.old = f.read()
        with open(self.listed, "w") as f:
            f.write(self.text)

    def __exit__(self, *exc):
        with open(self.listed, "w") as f:
            f.write(self.old)


def test_one_agent_under_four_spellings_gets_one_post(fleet):
    from support import Host
    hub, agents, listed = fleet
    base = os.path.dirname(listed)
    local = Host(hub.sandbox, os.path.join(base, "agent-local"), hub.nas, role="agent",
                 name="local", address="127.0.0.1", port=3081, python=PYTHON, settle=0.5,
                 node=hub.node, env={"BACKEND_AI_TOKEN_FILE": os.path.join(base, "token")})
    local.install_base("2.0.10")
    agents[0].publish("2.0.17")
    with started_hosts([local]), listed_as(listed, "localhost\nLOCALHOST:3081\n127.0.0.1\n"
                                                   "localhost.:3081\n"):
        before = post_update_counts([local])
        assert hub.api("POST", "/update", {"version": "2.0.17", "target": "agents"})[0] == 200
        rollout = wait_rollout(hub)["agents"]
        assert rollout["state"] == "succeeded", rollout
        assert [(e["agent"], e.get("aliases")) for e in rollout["agents"]] == [
            ("localhost:3081", ["127.0.0.1:3081"])]
        assert [n - b for n, b in zip(post_update_counts([local]), before)] == [1]
        local.assert_installed("2.0.17")


def test_bad_entries_reach_no_host_and_make_no_500(fleet):
    """`127.0.1.010` is 127.0.1.8 to the resolver (octal): nothing may reach that host."""
    hub, agents, listed = fleet
    witness = socket.socket()
    witness.bind(("127.0.1.8", 3081))
    witness.listen(8)
    witness.settimeout(0.2)
    agents[0].publish("2.0.18")
    try:
        with listed_as(listed, "127.0.1.1\n127.0.1.010\nagent7..lan\n"):
            status, body = hub.api("GET", "/agents")
            assert status == 200, body
            errors = {e["agent"]: e["error"] for e in body["agents"]}
            assert errors["127.0.1.1:3081"] is None
            assert "leading zeros" in errors["127.0.1.010"]
            assert "not a host name" in errors["agent7..lan"]
            assert hub.api("POST", "/update", {"version": "2.0.18", "target": "agents"})[0] == 200
            rollout = wait_rollout(hub)["agents"]
            states = {e["agent"]: e["state"] for e in rollout["agents"]}
            assert states == {"127.0.1.1:3081": "succeeded", "127.0.1.010": "unreachable",
                              "agent7..lan": "unreachable"}, rollout
            assert rollout["state"] == "incomplete"
        with pytest.raises(socket.timeout):
            witness.accept()  # nobody connected to 127.0.1.8
    finally:
        witness.close()


def test_a_crash_printing_100_kb_is_rolled_back_in_seconds_and_readable_afterwards(fleet):
    hub, agents, listed = fleet
    crash = b'console.error("y".repeat(100000)); process.exit(1);\n'
    agents[0].publish("2.0.19", extra={"dist/index.js": crash})
    with listed_as(listed, "127.0.1.1\n"):
        started = time.monotonic()
        assert hub.api("POST", "/update", {"version": "2.0.19", "target": "agents"})[0] == 200
        rollout = wait_rollout(hub)["agents"]
        took = time.monotonic() - started
        entry = rollout["agents"][0]
        assert entry["state"] == "rolled_back", entry  # not lost after the agent timeout
        assert rollout["state"] == "halted"
        status, body = hub.api("GET", "/agents")
        one = body["agents"][0]
        assert one["reachable"] is True and one["error"] is None, one
        assert one["update"]["state"] == "rolled_back" and len(one["update"]["error"]) < 2600
    agents[0].assert_installed("2.0.18")
    print(f"\na crash printing 100 KB: rolled_back after {took:.1f} s; GET /agents reads it")


def test_a_hub_killed_after_the_budget_is_spent_records_the_other_agents_outcome(fleet):
    """Agent 1 rolls back at once (the budget is 0); agent 2, in the same batch, is still
    downloading (slowly) when the hub's manager is killed: after the restart its real outcome
    is recorded, and it got one POST."""
    hub, agents, listed = fleet
    nas = hub.nas
    agents[0].publish("2.0.20", crash=True)
    hub.publish("2.0.20")  # agent 2 takes the hub's tarball of 2.0.20 (the same Node app)
    nas.faults[nas.path_of("2.0.20")] = "throttle:1000000"
    agents[1].restart_manager(BACKEND_AI_NAS_URL=nas.url_template("hub"))
    hub.restart_manager(BACKEND_AI_ROLLOUT_BATCHES="100%")
    before = post_update_counts(agents[:2])
    try:
        with listed_as(listed, "127.0.1.1\n127.0.1.2\n"):
            assert hub.api("POST", "/update", {"version": "2.0.20", "target": "agents"})[0] \
                == 200
            deadline, spent = time.monotonic() + 60, None
            while time.monotonic() < deadline and not spent:
                entries = hub.api("GET", "/update")[1]["agents"]["agents"]
                if entries[0]["state"] == "rolled_back" and entries[1]["state"] == "updating":
                    spent = entries
                time.sleep(0.05)
            assert spent, "never saw agent 1 rolled back while agent 2 was updating"
            pid = hub.manager_pid()
            hub.sandbox.systemctl("kill", "-s", "KILL", hub.MANAGER_UNIT)
            record = wait_rollout(hub)
            assert hub.manager_pid() != pid
            rollout = record["agents"]
            assert [e["state"] for e in rollout["agents"]] == ["rolled_back", "succeeded"], \
                rollout
            assert rollout["state"] == "halted" and rollout["counts"] == {
                "rolled_back": 1, "succeeded": 1}
            assert all(e["finished_at"] for e in rollout["agents"])
            assert [n - b for n, b in zip(post_update_counts(agents[:2]), before)] == [1, 1]
            import trees  # agent 2's tree, byte for byte, against GNU tar's of the hub tarball
            expected = nas.expected_tree("2.0.20", "hub")
            trees.assert_same(expected, trees.installed(agents[1].install_dir, expected),
                              agents[1].install_dir)
    finally:
        nas.faults.pop(nas.path_of("2.0.20"), None)
        agents[1].restart_manager()
        hub.restart_manager()
