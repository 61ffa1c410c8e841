"""The hub's view of its agents, fast and without root: GET /agents on a hub manager run in
this process (support.Running), against agents played by sockets on their own loopback
addresses (127.0.2.N:3081): good ones answering like a manager, and bad ones that refuse,
never answer, trickle, answer garbage, an endless body or a 500. The end-to-end test with real
agent managers in the systemd sandbox is tests/test_e2e_fleet.py. Also the hub-only settings."""

import json
import os
import socket
import threading
import time

import pytest

import backend_ai_manager as bam
from support import Nas, Running, release_files


class FakeAgent:
    """A listener on (address, 3081) answering every connection with `behaviour`."""

    def __init__(self, address, behaviour, version="2.0.10", token=None, manager=None):
        self.address, self.behaviour, self.version, self.token = address, behaviour, version, token
        self.manager = manager or {"version": bam.__version__, "state": "good"}
        self.requests = []
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((address, 3081))
        self.sock.listen(16)
        self.stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn):
        with conn:
            conn.settimeout(10)
            try:
                request = conn.recv(65536)
            except OSError:
                return
            self.requests.append(request)
            self.respond(conn, request)

    def respond(self, conn, request):
        if self.behaviour == "silent":
            self.stop.wait(30)
            return
        if self.behaviour == "trickle":
            for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}":
                if self.stop.wait(0.5):
                    return
                conn.sendall(bytes([byte]))
            return
        if self.behaviour == "slow":  # answers after 1.5 s
            if self.stop.wait(1.5):
                return
            self.behaviour = "good"
            try:
                self.respond(conn, request)
            finally:
                self.behaviour = "slow"
            return
        if self.behaviour == "endless":
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n")
            try:
                while not self.stop.is_set():
                    conn.sendall(b"x" * 65536)
            except OSError:
                return
            return
        if self.behaviour == "garbage":
            body = b"<html>hello</html>"
            status = b"200 OK"
        elif self.behaviour == "error":
            body = json.dumps({"success": False, "error": "systemctl timed out"}).encode()
            status = b"500 Internal Server Error"
        elif self.token and f"Bearer {self.token}".encode() not in request:
            body = json.dumps({"success": False, "error": "missing or wrong bearer token"})
            body, status = body.encode(), b"401 Unauthorized"
        else:
            body = json.dumps({"running": True, "active_state": "active",
                               "version": self.version, "manager": self.manager,
                               "update": {"state": "idle", "version": None, "error": None,
                                          "log": ["not copied"]}}).encode()
            status = b"200 OK"
        conn.sendall(b"HTTP/1.1 " + status + b"\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)

    def close(self):
        self.stop.set()
        # shutdown() wakes the thread blocked in accept(); close() alone would leave the
        # address bound until it returns.
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


@pytest.fixture
def fleet(tmp_path):
    token = tmp_path / "agent-token"
    token.write_text("agent-token-0123456789\n")
    agents = {
        "127.0.2.1:3081": FakeAgent("127.0.2.1", "good", token="agent-token-0123456789"),
        "127.0.2.2:3081": FakeAgent("127.0.2.2", "good", token="agent-token-0123456789",
                                    manager={"version": "../x"}),  # not a version: none
        "127.0.2.3:3081": FakeAgent("127.0.2.3", "good", "2.0.11",
                                    token="agent-token-0123456789",
                                    manager={"version": "9.1.0", "state": "trial"}),
        "127.0.2.4:3081": None,  # nothing listens: refused
        "127.0.2.5:3081": FakeAgent("127.0.2.5", "silent"),
        "127.0.2.6:3081": FakeAgent("127.0.2.6", "trickle"),
        "127.0.2.7:3081": FakeAgent("127.0.2.7", "garbage"),
        "127.0.2.8:3081": FakeAgent("127.0.2.8", "endless"),
        "127.0.2.9:3081": FakeAgent("127.0.2.9", "error"),
    }
    listed = tmp_path / "agents"
    listed.write_text("# the fleet\n" + "\n".join(agents) + "\n")
    running = Running(tmp_path, agents=f"@{listed}", agent_token_file=str(token))
    yield running, agents, listed
    running.close()
    for agent in agents.values():
        if agent:
            agent.close()


def test_agents_answers_within_its_deadline_and_says_what_each_agent_did(fleet):
    running, agents, _ = fleet
    started = time.monotonic()
    code, body, _ = running.request("GET", "/agents")
    took = time.monotonic() - started
    assert code == 200, body
    assert took < bam.AGENT_STATUS_DEADLINE + 0.5, f"GET /agents took {took:.2f} s"
    by_agent = {entry["agent"]: entry for entry in body["agents"]}
    assert list(by_agent) == list(agents)  # the order of the list
    good = by_agent["127.0.2.1:3081"]
    assert good["reachable"] and good["running"] is True and good["version"] == "2.0.10"
    assert good["update"] == {"state": "idle", "version": None, "error": None}
    assert good["error"] is None and good["rtt_ms"] is not None
    assert [by_agent[f"127.0.2.{n}:3081"]["manager"] for n in (1, 2, 3, 4)] == [
        bam.__version__, None, "9.1.0", None]
    expected_errors = {
        "127.0.2.4:3081": (False, "refused"),
        "127.0.2.5:3081": (False, "no answer within 5 s"),
        "127.0.2.6:3081": (False, "no answer within 5 s"),
        "127.0.2.7:3081": (True, "malformed answer (HTTP 200): not JSON"),
        "127.0.2.8:3081": (True, "answer over 65536 bytes"),
        "127.0.2.9:3081": (True, "HTTP 500: systemctl timed out"),
    }
    for agent, (answered, words) in expected_errors.items():
        entry = by_agent[agent]
        assert entry["reachable"] is answered and words in (entry["error"] or ""), entry
        assert entry["running"] is None and entry["version"] is None
    assert body["summary"] == {
        "total": 9, "reachable": 6, "running": 3, "versions": {"2.0.10": 2, "2.0.11": 1},
        "hub_version": "2.0.10", "skew": ["127.0.2.3:3081"],
        "manager_versions": {bam.__version__: 1, "9.1.0": 1}, "hub_manager": bam.__version__,
        "manager_skew": ["127.0.2.3:3081"]}


def test_the_agent_token_goes_to_agents(fleet):
    running, agents, _ = fleet
    running.request("GET", "/agents")
    assert b"Authorization: Bearer agent-token-0123456789" in agents["127.0.2.1:3081"].requests[0]


def test_the_agent_token_goes_to_nothing_else(tmp_path):
    """Not to the NAS (the release, its .sha256) nor to the health URL."""
    token = tmp_path / "agent-token"
    token.write_text("agent-token-0123456789\n")
    with Nas(str(tmp_path / "nas")) as nas:
        nas.publish("2.0.11", release_files("2.0.11"))
        with Running(tmp_path, agents="127.0.2.1", agent_token_file=str(token),
                     nas_url=nas.url_template(),
                     health_url=f"http://127.0.0.1:{nas.port}/api/raw/2.0.11/hub-2.0.11.tar.gz"
                     ".sha256") as running:
            status, body, _ = running.request("POST", "/update", {"version": "2.0.11",
                                                                   "target": "hub"})
            assert status == 200, body
            assert running.wait_update(20)["state"] == "succeeded"
        assert len(nas.requests) >= 3  # .sha256, tarball, health URL
        assert nas.authorizations == [None] * len(nas.requests)


def test_an_agent_list_file_is_read_again_at_each_request(fleet):
    running, agents, listed = fleet
    listed.write_text("127.0.2.1\n127.0.2.2:3081  # the port may be left out\n")
    code, body, _ = running.request("GET", "/agents")
    assert [e["agent"] for e in body["agents"]] == ["127.0.2.1:3081", "127.0.2.2:3081"]
    listed.write_text("127.0.2.1:3081, 127.0.2.3:3081\n")
    code, body, _ = running.request("GET", "/agents")
    assert [e["agent"] for e in body["agents"]] == ["127.0.2.1:3081", "127.0.2.3:3081"]
    # A bad entry written while the hub runs is that agent's error, never the fleet's (no
    # 500), and nothing is sent for it: a zero-padded address would go to another host.
    listed.write_text("not an agent!\n127.0.2.1\nagent7..lan\n127.0.2.010\n")
    code, body, _ = running.request("GET", "/agents")
    assert code == 200, body
    by_agent = {e["agent"]: e for e in body["agents"]}
    assert list(by_agent) == ["not an agent!", "127.0.2.1:3081", "agent7..lan", "127.0.2.010"]
    assert by_agent["127.0.2.1:3081"]["reachable"] is True
    for bad in ("not an agent!", "agent7..lan", "127.0.2.010"):
        assert not by_agent[bad]["reachable"] and by_agent[bad]["error"].startswith(
            "not a valid agent: "), by_agent[bad]
    assert "leading zeros" in by_agent["127.0.2.010"]["error"]
    listed.unlink()
    code, body, _ = running.request("GET", "/agents")
    assert code == 500 and "cannot read the agent list" in body["error"], body


def test_agents_is_a_hub_endpoint(tmp_path):
    with Running(tmp_path, role="agent") as running:
        assert running.request("GET", "/agents")[0] == 404


def test_an_agent_refuses_hub_settings():
    for name, flag, env, _parse, _help in bam.OPTIONS:
        if name not in bam.HUB_ONLY:
            continue
        value = {"agents": "10.0.0.5", "agent_token_file": os.devnull, "rollout_batches": "1",
                 "rollout_parallel": "2", "rollout_max_failures": "1",
                 "rollout_agent_timeout": "60"}[name]
        with pytest.raises(bam.ConfigError, match=flag.replace("-", r"\-")):
            bam.resolve_settings({"role": "agent", name: value}, {})
        with pytest.raises(bam.ConfigError, match=env):
            bam.resolve_settings({"role": "agent"}, {env: value})


@pytest.mark.parametrize("text, agents", [
    ("10.0.0.5", ["10.0.0.5:3081"]),
    ("a.lan:4000, b.lan", ["a.lan:4000", "b.lan:3081"]),
    ("# comment\n10.0.0.5\n\n10.0.0.6:3082 # six\n10.0.0.5", ["10.0.0.5:3081", "10.0.0.6:3082"]),
    ("[::1]:3081", ["[::1]:3081"]),
])
def test_agent_lists(text, agents):
    assert bam.parse_agents(text) == agents


@pytest.mark.parametrize("text", ["10.0.0.5:99999", "http://x", "a b", "[zz]:1", "x:"])
def test_bad_agent_lists_are_refused(text):
    with pytest.raises(ValueError):
        bam.parse_agents(text)


def polls_until_seen(duration):
    """The hub's polls of an agent whose update takes `duration` seconds: (how many, how late
    the last one sees the end)."""
    at, polls = 0.0, 0
    while at < duration:
        at += bam.agent_poll_interval(at)
        polls += 1
    return polls, at - duration


@pytest.mark.parametrize("duration", [0.03, 0.4, 3.0, 45.0, 900.0])
def test_an_agents_end_is_seen_soon_and_a_long_update_costs_few_polls(duration):
    polls, late = polls_until_seen(duration)
    # Seen at most 50 ms or a tenth of the time (1 s at most) after it ended...
    assert late <= max(0.05, min(1.0, duration / 10)) + 1e-9, (duration, late)
    # ... and never polled faster than every 50 ms, or more than about once a second later on.
    assert polls <= duration / 0.05 + 1
    assert polls <= 60 + duration, (duration, polls)


# --- the rollout, against fake agent managers -------------------------------------------------

class FakeManager(FakeAgent):
    """An agent manager in miniature: GET /status, POST /update (counted), GET /update. An
    update works `work` seconds, then ends as `outcome` says (succeeded moves the version);
    outcome 'hang' never ends."""

    def __init__(self, address, version="2.0.10", outcome="succeeded", work=0.3):
        self.outcome, self.work, self.posts = outcome, work, []
        self.job = {"action": None, "state": "idle", "version": None, "error": None}
        super().__init__(address, "manager", version)

    def respond(self, conn, request):
        line = request.split(b"\r\n", 1)[0].decode()
        body = request.partition(b"\r\n\r\n")[2]
        if line.startswith("POST /update "):
            version = json.loads(body)["version"]
            self.posts.append(version)
            self.job = {"action": "update", "state": "downloading", "version": version,
                        "error": None, "step": "downloading",
                        "rollout": json.loads(body).get("rollout")}
            threading.Thread(target=self._work, args=(version,), daemon=True).start()
            answer = {"success": True, "message": f"Agent update to version {version} "
                      "started"}
        elif line.startswith("GET /update "):
            answer = dict(self.job)
        else:
            answer = {"running": True, "active_state": "active", "version": self.version,
                      "update": dict(self.job)}
        data = json.dumps(answer).encode()
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: " + str(len(data)).encode() +
                     b"\r\n\r\n" + data)

    def _work(self, version):
        if self.outcome == "die":  # the agent's manager goes away mid-update
            self.close()
            return
        if self.stop.wait(self.work) or self.outcome == "hang":
            return
        if self.outcome == "succeeded":
            self.version = version
        self.job = dict(self.job, state=self.outcome, error=None if self.outcome == "succeeded"
                        else f"the release {version} {self.outcome}")


@pytest.fixture
def rollout(tmp_path):
    """make(outcomes, **settings) -> (hub, managers): fake managers on 127.0.3.N:3081."""
    made = []

    def make(outcomes, **settings):
        managers = []
        for n, outcome in enumerate(outcomes, 1):
            managers.append(FakeManager(f"127.0.3.{n}", outcome=outcome) if outcome else None)
        made.extend(m for m in managers if m)
        agents = ",".join(f"127.0.3.{n}" for n in range(1, len(outcomes) + 1))
        hub = Running(tmp_path / f"hub{len(made)}", agents=agents, **settings)
        made.append(hub)
        return hub, managers

    for n in range(20):
        (tmp_path / f"hub{n}").mkdir()
    yield make
    for thing in made:
        thing.close()


def roll(hub, version="2.0.11", timeout=60):
    code, body, _ = hub.request("POST", "/update", {"version": version, "target": "agents"})
    assert code == 200 and body["message"] == f"Agents update to version {version} started", body
    deadline = time.monotonic() + timeout
    while hub.rollout.running() and time.monotonic() < deadline:
        time.sleep(0.05)
    return hub.request("GET", "/update")[1]["agents"]


def test_a_rollout_goes_batch_by_batch_canary_first(rollout):
    hub, managers = rollout(["succeeded"] * 6, rollout_batches="1,2,100%", rollout_parallel="2")
    record = roll(hub)
    assert record["state"] == "succeeded" and record["counts"] == {"succeeded": 6}, record
    entries = record["agents"]
    assert [e["batch"] for e in entries] == [1, 2, 2, 3, 3, 3]
    assert all(e["from_version"] == "2.0.10" and e["error"] is None for e in entries)
    for batch in (2, 3):  # each batch starts once the one before has ended, the canary alone
        before = [e for e in entries if e["batch"] == batch - 1]
        after = [e for e in entries if e["batch"] == batch]
        assert max(e["finished_at"] for e in before) <= min(e["started_at"] for e in after)
    assert [m.posts for m in managers] == [["2.0.11"]] * 6


def test_a_failure_halts_the_rollout_and_a_resume_finishes_it(rollout):
    hub, managers = rollout(["succeeded", "succeeded", "failed", "succeeded", "succeeded"],
                            rollout_batches="1,2,100%", rollout_parallel="2")
    record = roll(hub)
    assert record["state"] == "halted" and "1 agents failed" in record["error"], record
    states = [e["state"] for e in record["agents"]]
    assert states == ["succeeded", "succeeded", "failed", "waiting", "waiting"]
    assert "the release 2.0.11 failed" in record["agents"][2]["error"]
    assert managers[3].posts == managers[4].posts == []  # the later batch was not touched
    managers[2].outcome = "succeeded"  # the release is fixed; resume
    record = roll(hub)
    assert record["state"] == "succeeded", record
    assert [e["state"] for e in record["agents"]] == ["current", "current", "succeeded",
                                                      "succeeded", "succeeded"]
    assert [len(m.posts) for m in managers] == [1, 1, 2, 1, 1]


def test_the_failure_budget_counts_over_the_whole_rollout(rollout):
    hub, managers = rollout(["succeeded", "rolled_back", "succeeded", "failed", "succeeded",
                             "succeeded"], rollout_batches="1,1", rollout_parallel="1",
                            rollout_max_failures="1")
    record = roll(hub)
    assert record["state"] == "halted", record
    assert [e["state"] for e in record["agents"]] == ["succeeded", "rolled_back", "succeeded",
                                                      "failed", "waiting", "waiting"]


def test_unreachable_and_lost_agents(rollout):
    hub, managers = rollout(["succeeded", None, "hang", "die"], rollout_batches="100%",
                            rollout_agent_timeout="2", rollout_max_failures="5")
    started = time.monotonic()
    record = roll(hub)
    assert time.monotonic() - started < 10
    states = {e["agent"]: (e["state"], e["error"]) for e in record["agents"]}
    assert states["127.0.3.2:3081"][0] == "unreachable"  # nothing was sent
    assert states["127.0.3.3:3081"][0] == "lost" and "within 2 s" in states["127.0.3.3:3081"][1]
    died = states["127.0.3.4:3081"]  # stopped answering after its update began
    assert died[0] == "lost" and "within 2 s" in died[1] and "refused" in died[1], died
    assert record["state"] == "incomplete" and record["counts"] == {
        "succeeded": 1, "unreachable": 1, "lost": 2}, record


def test_halt_lets_running_agents_finish_and_starts_no_new_one(rollout):
    hub, managers = rollout(["succeeded"] * 4, rollout_batches="2,100%", rollout_parallel="2")
    for manager in managers:
        manager.work = 1.5
    code, body, _ = hub.request("POST", "/update", {"version": "2.0.11", "target": "agents"})
    assert code == 200
    deadline = time.monotonic() + 5
    while not all(m.posts for m in managers[:2]) and time.monotonic() < deadline:
        time.sleep(0.05)
    code, body, _ = hub.request("POST", "/update/halt")
    assert code == 200, body
    record = roll_until_done(hub)
    assert record["state"] == "halted" and "halted on request" in record["error"], record
    assert [e["state"] for e in record["agents"]] == ["succeeded", "succeeded", "waiting",
                                                      "waiting"]
    assert managers[2].posts == managers[3].posts == []
    assert hub.request("POST", "/update/halt")[0] == 409  # nothing running now


def roll_until_done(hub, timeout=30):
    deadline = time.monotonic() + timeout
    while hub.rollout.running() and time.monotonic() < deadline:
        time.sleep(0.05)
    return hub.request("GET", "/update")[1]["agents"]


def test_a_restarted_hub_polls_an_agent_it_had_sent_the_update_to(rollout, tmp_path):
    hub, managers = rollout(["succeeded", "succeeded"], rollout_batches="100%")
    managers[0].job = {"action": "update", "state": "succeeded", "version": "2.0.11",
                       "error": None}
    managers[0].version = "2.0.11"
    settings = hub.updater.settings
    hub.close()
    record = {"action": "rollout", "state": "rolling", "version": "2.0.11", "after_hub": False,
              "halt": False, "counts": {}, "error": None, "log": [], "agents": [
                  {"agent": "127.0.3.1:3081", "batch": 1, "state": "updating",
                   "from_version": "2.0.10", "version": "2.0.11", "step": None, "error": None,
                   "started_at": "2026-11-29T12:00:00Z", "finished_at": None},
                  {"agent": "127.0.3.2:3081", "batch": 1, "state": "waiting",
                   "from_version": None, "version": "2.0.11", "step": None, "error": None,
                   "started_at": None, "finished_at": None}]}
    with open(os.path.join(settings.state_dir, "rollout.json"), "w") as f:
        json.dump(record, f)
    rolled = bam.Rollout(settings)  # a restarted hub: a new manager on the same record
    rolled.recover(bam.IDLE, "2.0.10")
    deadline = time.monotonic() + 20
    while rolled.running() and time.monotonic() < deadline:
        time.sleep(0.05)
    after = rolled.view()
    assert after["state"] == "succeeded", after
    assert [e["state"] for e in after["agents"]] == ["succeeded", "succeeded"]
    assert managers[0].posts == [] and managers[1].posts == ["2.0.11"]  # polled, never re-sent


def test_bad_agents_do_not_break_the_bookkeeping(rollout, tmp_path):
    hub, managers = rollout(["succeeded"], rollout_batches="100%", rollout_max_failures="5")
    bad = [FakeAgent("127.0.3.2", "garbage"), FakeAgent("127.0.3.3", "endless"),
           FakeAgent("127.0.3.4", "error")]
    try:
        hub.close()
        (tmp_path / "bad").mkdir()
        again = Running(tmp_path / "bad", agents="127.0.3.1,127.0.3.2,127.0.3.3,127.0.3.4",
                        rollout_batches="100%", rollout_max_failures="5")
        record = roll(again)
        again.close()
        states = [(e["state"], e["error"]) for e in record["agents"]]
        assert states[0] == ("succeeded", None)
        assert [s for s, _ in states[1:]] == ["unreachable"] * 3, states
        assert "not JSON" in states[1][1] and "65536" in states[2][1] and "HTTP 500" in states[3][1]
        assert record["state"] == "incomplete" and sum(record["counts"].values()) == 4
    finally:
        for agent in bad:
            agent.close()


def test_while_a_rollout_runs_updates_are_refused_and_control_is_not(rollout):
    hub, managers = rollout(["succeeded"], rollout_batches="100%")
    managers[0].work = 1.5
    assert hub.request("POST", "/update", {"version": "2.0.11", "target": "agents"})[0] == 200
    assert hub.request("POST", "/update", {"version": "2.0.12"})[0] == 409
    assert hub.request("POST", "/rollback")[0] == 409
    assert hub.request("POST", "/restart")[0] == 200  # the hub's own service
    assert hub.request("POST", "/update", {"version": "2.0.11", "target": "x"})[0] == 400
    roll_until_done(hub)


def test_the_hub_updates_itself_first_and_the_agents_only_if_it_succeeded(rollout, tmp_path):
    from support import Nas, release_files
    with Nas(str(tmp_path / "nas")) as nas:
        nas.publish("2.0.11", release_files("2.0.11"))
        hub, managers = rollout(["succeeded", "succeeded"], rollout_batches="100%",
                                nas_url=nas.url_template())
        code, body, _ = hub.request("POST", "/update", {"version": "2.0.11"})
        assert code == 200 and body["message"] == "Hub update to version 2.0.11 started"
        record = roll_until_done(hub)
        assert hub.updater.view()["state"] == "succeeded"
        assert record["state"] == "succeeded" and [m.posts for m in managers] == [["2.0.11"]] * 2
        hub.systemd.unhealthy = {"2.0.12"}  # the hub's own release is bad: no agent touched
        nas.publish("2.0.12", release_files("2.0.12"))
        assert hub.request("POST", "/update", {"version": "2.0.12"})[0] == 200
        deadline = time.monotonic() + 30
        while (hub.updater.busy() or hub.rollout.running()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert hub.updater.view()["state"] == "rolled_back"
        record = hub.request("GET", "/update")[1]["agents"]
        assert record["state"] == "halted" and "hub's update ended rolled_back" in record["error"]
        assert [m.posts for m in managers] == [["2.0.11"]] * 2


def test_concurrent_agents_requests_share_one_fan_out(tmp_path):
    """GET /agents cannot be used to multiply traffic to the agents: the requests that arrive
    while a fan-out runs get its answer; the next request after it starts a new one."""
    agent = FakeAgent("127.0.2.1", "slow")
    running = Running(tmp_path, agents="127.0.2.1")
    try:
        answers = []

        def ask():
            answers.append(running.request("GET", "/agents"))
        threads = [threading.Thread(target=ask) for _ in range(10)]
        for thread in threads:
            thread.start()
            time.sleep(0.02)
        for thread in threads:
            thread.join(30)
        assert len(answers) == 10 and all(code == 200 for code, _, _ in answers)
        assert len(agent.requests) == 1
        assert all(body == answers[0][1] for _, body, _ in answers)
        assert answers[0][1]["agents"][0]["reachable"] is True
        assert running.request("GET", "/agents")[0] == 200
        assert len(agent.requests) == 2
    finally:
        running.close()
        agent.close()


@pytest.mark.parametrize("failing", ["every durable save", "the save before a POST"])
def test_a_rollout_whose_record_cannot_be_saved_ends_halted_and_sends_nothing(rollout, failing):
    """A durable save that fails (a full disk) never leaves the rollout `rolling` with nothing
    running it, and an agent whose `updating` mark is not on disk is not sent its update."""
    hub, managers = rollout(["succeeded"] * 3, rollout_batches="1,100%")
    job = hub.rollout.job
    real = job._save

    def save(durable=False):
        updating = any(e["state"] == bam.UPDATING for e in job.fields.get("agents") or ())
        if durable and (failing == "every durable save" or updating):
            raise OSError(28, "No space left on device")
        return real(durable)
    job._save = save
    record = roll(hub, timeout=30)
    assert not hub.rollout.running()
    if failing == "every durable save":
        assert record["state"] == "halted" and "No space left on device" in record["error"]
    else:  # nothing was sent: unreachable, not counted against the budget
        assert record["state"] == "incomplete", record
        assert [e["state"] for e in record["agents"]] == ["unreachable"] * 3
        assert all("No space left on device" in e["error"] and "nothing was sent" in e["error"]
                   for e in record["agents"])
    assert [m.posts for m in managers] == [[], [], []]
