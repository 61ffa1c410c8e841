"""The rollout's bookkeeping under the faults a review found (fast, no root): a hub manager in
this process (support.Running) against small fake agent managers on 127.0.x.y:3081 (the
FakeManager of test_fleet.py). One test per finding; the end-to-end versions with real agent
managers are in test_e2e_fleet.py."""

import json
import os
import socket
import threading
import time

import pytest

import backend_ai_manager as bam
from support import Running
from test_fleet import FakeManager, roll


@pytest.fixture
def made():
    things = []
    yield things
    for thing in things:
        thing.close()


def hub_for(tmp_path, made, name="hub", **settings):
    (tmp_path / name).mkdir()
    hub = Running(tmp_path / name, **settings)
    made.append(hub)
    return hub


def manager(made, address, **kwargs):
    fake = FakeManager(address, **kwargs)
    made.append(fake)
    return fake


def wait_over(rollout, timeout=30):
    deadline = time.monotonic() + timeout
    while rollout.running() and time.monotonic() < deadline:
        time.sleep(0.05)
    return rollout.view()


# --- entries: one spelling, one agent ---------------------------------------------------------

def test_four_spellings_of_one_agent_get_one_post(tmp_path, made):
    agent = manager(made, "127.0.0.1")
    hub = hub_for(tmp_path, made, agents="localhost,LOCALHOST:3081,127.0.0.1,localhost.:3081",
                  rollout_parallel="4", rollout_batches="100%")
    record = roll(hub)
    assert record["state"] == "succeeded", record
    assert len(record["agents"]) == 1 and record["agents"][0]["agent"] == "localhost:3081"
    assert record["agents"][0]["aliases"] == ["127.0.0.1:3081"]  # which spellings were merged
    assert agent.posts == ["2.0.11"]


@pytest.mark.parametrize("entry, problem", [
    ("127.0.1.010", "leading zeros"), ("010.0.0.1", "leading zeros"), ("1.2.3", "dotted decimal"),
    ("agent7..lan", "not a host name"), ("a" * 64 + ".lan", "not a host name"),
    (".", "not a host name"), ("[1::2::3]", "IPv6"),
])
def test_a_bad_entry_stops_the_start_naming_it(tmp_path, entry, problem):
    with pytest.raises(bam.ConfigError, match=problem) as error:
        Running(tmp_path, agents=f"127.0.0.2,{entry}")
    assert repr(entry) in error.value.message


def test_a_bad_entry_written_later_is_that_agents_error_and_nothing_is_sent(tmp_path, made):
    good = manager(made, "127.0.3.1")
    wrong = manager(made, "127.0.3.8")  # where 127.0.3.010 would go, read as octal
    listed = tmp_path / "agents"
    listed.write_text("127.0.3.1\n")
    hub = hub_for(tmp_path, made, agents=f"@{listed}", rollout_batches="100%")
    listed.write_text("127.0.3.1\nagent7..lan\n127.0.3.010\n")
    record = roll(hub)
    states = {e["agent"]: (e["state"], e["error"]) for e in record["agents"]}
    assert states["127.0.3.1:3081"] == ("succeeded", None)
    for bad in ("agent7..lan", "127.0.3.010"):
        assert states[bad][0] == "unreachable" and "not a valid agent" in states[bad][1]
    assert record["state"] == "incomplete", record  # not halted: nothing was sent to them
    assert good.posts == ["2.0.11"] and wrong.requests == []


def test_the_hub_listed_among_its_agents_is_not_sent_an_update(tmp_path, made):
    (tmp_path / "hub").mkdir()
    hub = Running(tmp_path / "hub", agents="127.0.3.1")
    made.append(hub)
    other = manager(made, "127.0.3.1")
    settings = bam.Settings(dict(vars(hub.updater.settings), port=hub.port,
                                 agents=f"127.0.0.1:{hub.port},127.0.3.1"))
    rollout = bam.Rollout(settings)
    rollout.begin("2.0.11", after_hub=False)
    rollout.run()
    entries = rollout.view()["agents"]
    assert entries[0]["hub"] is True and entries[0]["state"] == "unreachable"
    assert "this is the hub itself" in entries[0]["error"]
    assert entries[1]["state"] == "succeeded" and other.posts == ["2.0.11"]


# --- answers: big, refused, busy, cut --------------------------------------------------------

class BigFailure(FakeManager):
    """Answers GET /update with a rolled_back record whose error is 70 KB (an agent of an
    older version quoting a crashed bundle's line)."""

    def respond(self, conn, request):
        if request.startswith(b"GET /update "):
            job = dict(self.job, error="unhealthy: " + "y" * 70000) if self.posts else self.job
            data = json.dumps(job).encode()
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(data) + data)
            return
        super().respond(conn, request)


def test_an_answer_too_big_to_take_is_classified_by_its_state(tmp_path, made):
    agent = BigFailure("127.0.3.1", outcome="rolled_back", work=0.1)
    made.append(agent)
    hub = hub_for(tmp_path, made, agents="127.0.3.1", rollout_agent_timeout="60")
    record = roll(hub)
    entry = record["agents"][0]
    assert entry["state"] == "rolled_back", entry  # not lost after the agent timeout
    assert record["state"] == "halted" and agent.posts == ["2.0.11"]


def test_an_agents_failure_text_stays_small(tmp_path, made):
    """The unit's last journal lines in a failure are cut to 500 characters each, about 2 KB
    in all, so the record stays readable by the hub (its limit is 64 KB)."""
    from support import Nas, release_files
    with Nas(str(tmp_path / "nas")) as nas, \
            Running(tmp_path, settle="0.2", nas_url=nas.url_template()) as running:
        nas.publish("2.0.11", release_files("2.0.11"))
        running.systemd.unhealthy.add("2.0.11")
        running.systemd.logs = lambda lines, output="short-iso": ("x" * 100000 + "\n") * 5
        assert running.request("POST", "/update", {"version": "2.0.11"})[0] == 200
        record = running.wait_update(20)
    assert record["state"] == "rolled_back", record
    assert 500 < len(record["error"]) < 2600, len(record["error"])
    assert len(json.dumps(running.updater.view())) < 16384


class Refusing(FakeManager):
    """Answers GET /status, then refuses connections (its manager stopped)."""

    def respond(self, conn, request):
        super().respond(conn, request)
        if request.startswith(b"GET /status"):
            self.close()


def test_a_post_that_cannot_be_sent_is_unreachable_not_lost(tmp_path, made):
    agent = Refusing("127.0.3.1")
    made.append(agent)
    hub = hub_for(tmp_path, made, agents="127.0.3.1")
    record = roll(hub)
    entry = record["agents"][0]
    assert entry["state"] == "unreachable" and "nothing was sent" in entry["error"], entry
    assert record["state"] == "incomplete"  # not counted against the budget


class AlreadyUpdating(FakeManager):
    """Already running an update to 2.0.11 (an operator started it): POST /update gets 409."""

    def respond(self, conn, request):
        if request.startswith(b"POST /update "):
            self.posts.append("refused")
            data = json.dumps({"success": False, "error": "an update to version 2.0.11 is "
                               "already running (downloading)"}).encode()
            conn.sendall(b"HTTP/1.1 409 Conflict\r\nContent-Length: %d\r\n\r\n" % len(data) + data)
            if self.job["state"] == "idle":
                self.job = {"action": "update", "state": "downloading", "version": "2.0.11",
                            "error": None, "step": "downloading", "rollout": None}
                threading.Thread(target=self._work, args=("2.0.11",), daemon=True).start()
            return
        super().respond(conn, request)


def test_an_agent_already_updating_to_the_version_is_followed(tmp_path, made):
    agent = AlreadyUpdating("127.0.3.1", work=1.0)
    made.append(agent)
    hub = hub_for(tmp_path, made, agents="127.0.3.1")
    record = roll(hub)
    entry = record["agents"][0]
    assert entry["state"] == "succeeded" and entry.get("adopted") is True, entry
    assert record["state"] == "succeeded" and agent.posts == ["refused"]


# --- the record: counts, resumes, halts --------------------------------------------------------

def test_counts_are_never_saved_stale(tmp_path, made):
    """Two agents marked at once, the first pre-empted between its two steps: the failure the
    second recorded is counted and stops the rollout (the review's M2, made deterministic)."""
    hub = hub_for(tmp_path, made, agents="10.0.0.1,10.0.0.2")
    rollout = hub.rollout
    rollout.job.fields = {"action": "rollout", "state": bam.ROLLING, "version": "2.0.11",
                          "log": [], "counts": {}, "agents": [
                              {"agent": a, "state": bam.WAITING} for a in ("x", "y")]}
    first, second = rollout.job.get("agents")
    real, second_done = rollout.job.set, threading.Event()

    def slow_set(*args, **kwargs):
        if threading.current_thread().name == "first":
            second_done.wait(5)
        return real(*args, **kwargs)
    rollout.job.set = slow_set
    a = threading.Thread(target=rollout._mark, args=(first, bam.SUCCEEDED), name="first")
    b = threading.Thread(target=lambda: (rollout._mark(second, bam.FAILED, "boom"),
                                         second_done.set()))
    a.start()
    b.start()
    a.join(10)
    b.join(10)
    assert rollout.job.get("counts") == {"succeeded": 1, "failed": 1}
    assert rollout._stop_reason() == "1 agents failed (--rollout-max-failures 0)"


def test_a_restarted_hub_follows_agents_mid_update_after_the_budget_is_spent(tmp_path, made):
    """The review's M1: after a failure has spent the budget, a restarted hub still polls the
    agents that were mid-update and records their real outcome."""
    busy = manager(made, "127.0.3.2", work=1.0)
    hub = hub_for(tmp_path, made, agents="127.0.3.1,127.0.3.2", rollout_batches="100%")
    settings = hub.updater.settings
    rollout = bam.Rollout(settings)
    rollout.begin("2.0.11", after_hub=False)
    failed, updating = rollout.job.get("agents")
    rollout.job.set(bam.ROLLING, "rolling")
    rollout._mark(failed, bam.FAILED, "the release crashed")
    rollout._mark(updating, bam.UPDATING, durable=True, sent=True)
    bam.call_agent("127.0.3.2:3081", "POST", "/update", None,  # the POST the old hub sent
                   body={"version": "2.0.11", "rollout": rollout.job.get("id")})
    restarted = bam.Rollout(settings)
    restarted.recover(bam.SUCCEEDED, "2.0.11")
    after = wait_over(restarted)
    assert after["state"] == "halted" and "1 agents failed" in after["error"], after
    assert [e["state"] for e in after["agents"]] == ["failed", "succeeded"]
    assert after["agents"][1]["finished_at"] and after["counts"] == {"failed": 1,
                                                                      "succeeded": 1}
    assert busy.posts == ["2.0.11"]  # polled, never sent again


def test_a_restarted_hub_does_not_take_an_older_job_for_this_rollouts(tmp_path, made):
    """The review's L5: the agent's record shows an update to the same version from another
    rollout (the hub died between its updating mark and its POST): lost, not that outcome."""
    agent = manager(made, "127.0.3.1")
    agent.job = {"action": "update", "state": "rolled_back", "version": "2.0.11",
                 "error": "an earlier try", "rollout": "0123456789abcdef"}
    hub = hub_for(tmp_path, made, agents="127.0.3.1")
    settings = hub.updater.settings
    rollout = bam.Rollout(settings)
    rollout.begin("2.0.11", after_hub=False)
    rollout.job.set(bam.ROLLING, "rolling")
    rollout._mark(rollout.job.get("agents")[0], bam.UPDATING, durable=True)
    restarted = bam.Rollout(settings)
    restarted.recover(bam.SUCCEEDED, "2.0.11")
    entry = wait_over(restarted)["agents"][0]
    assert entry["state"] == "lost" and "not this rollout's update" in entry["error"], entry
    assert agent.posts == []


class SlowStatus(FakeManager):
    def respond(self, conn, request):
        if request.startswith(b"GET /status"):
            self.stop.wait(1.5)
        super().respond(conn, request)


def test_a_halt_during_an_agents_status_check_starts_nothing(tmp_path, made):
    agent = SlowStatus("127.0.3.1")
    made.append(agent)
    hub = hub_for(tmp_path, made, agents="127.0.3.1")
    assert hub.request("POST", "/update", {"version": "2.0.11", "target": "agents"})[0] == 200
    time.sleep(0.5)  # inside the status check
    assert hub.request("POST", "/update/halt")[0] == 200
    record = wait_over(hub.rollout)
    assert record["state"] == "halted" and record["agents"][0]["state"] == "waiting", record
    assert agent.posts == []


def test_a_halt_that_stopped_nothing_ends_succeeded_and_a_halt_after_the_end_is_refused(
        tmp_path, made):
    agents = [manager(made, f"127.0.3.{n}", work=0.8) for n in (1, 2)]
    hub = hub_for(tmp_path, made, agents="127.0.3.1,127.0.3.2", rollout_batches="100%",
                  rollout_parallel="2")
    assert hub.request("POST", "/update", {"version": "2.0.11", "target": "agents"})[0] == 200
    deadline = time.monotonic() + 5
    while not all(a.posts for a in agents) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert hub.request("POST", "/update/halt")[0] == 200  # during the last batch
    record = wait_over(hub.rollout)
    assert record["state"] == "succeeded" and record["error"] is None, record
    code, body, _ = hub.request("POST", "/update/halt")
    assert code == 409 and body["error"] == "no rollout is running"


# --- the hub's own update, settings, the client, pack ------------------------------------------

def test_a_hub_with_an_empty_agent_list_updates_itself(tmp_path, made):
    from support import Nas, release_files
    listed = tmp_path / "agents"
    listed.write_text("# nobody yet\n")
    with Nas(str(tmp_path / "nas")) as nas:
        nas.publish("2.0.11", release_files("2.0.11"))
        hub = hub_for(tmp_path, made, agents=f"@{listed}", nas_url=nas.url_template())
        code, body, _ = hub.request("POST", "/update", {"version": "2.0.11"})
        assert code == 200 and "agents" not in body, body
        assert hub.wait_update(20)["state"] == "succeeded"
        listed.unlink()  # unreadable: nothing starts, and the answer says what to do
        code, body, _ = hub.request("POST", "/update", {"version": "2.0.12"})
        assert code == 500 and "cannot read the agent list" in body["error"]
        assert "target 'hub'" in body["error"] and hub.updater.view()["version"] == "2.0.11"


@pytest.mark.parametrize("name", ["download_timeout", "command_timeout", "request_timeout",
                                  "rollout_agent_timeout"])
def test_a_zero_timeout_is_refused(tmp_path, name):
    with pytest.raises(bam.ConfigError, match="from 0.1 to"):
        Running(tmp_path, **{name: "0"})


def test_settle_zero_is_still_allowed(tmp_path):
    with Running(tmp_path, settle="0") as running:
        assert running.updater.settings.settle == 0


def test_an_update_whose_recovery_fails_too_ends_failed_and_calls_back(tmp_path, monkeypatch):
    with Running(tmp_path) as running:
        def broken(*args, **kwargs):
            raise RuntimeError("first")
        monkeypatch.setattr(running.updater, "_fetch", broken)
        monkeypatch.setattr(running.updater.releases, "recover",
                            lambda: (_ for _ in ()).throw(OSError(5, "Input/output error")))
        ended = []
        running.updater.start_update("2.0.11", then=ended.append)
        record = running.wait_update(10)
    assert record["state"] == "failed" and "Input/output error" in record["step"], record
    assert ended == ["failed"]


def test_the_client_follows_a_job_through_a_short_loss_of_contact(monkeypatch):
    client = bam.Client("127.0.0.1:9", "", False, out=open(os.devnull, "w"),
                        err=open(os.devnull, "w"))
    answers = [bam.ClientError("no answer", bam.EXIT_UNREACHABLE)] * 2 + [{"state": "idle"}]

    def call(method, path, body=None):
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer
    monkeypatch.setattr(client, "call", call)
    monkeypatch.setattr(bam.time, "sleep", lambda seconds: None)
    assert client._poll() == {"state": "idle"}
    client.CONTACT_GRACE = -1
    answers[:] = [bam.ClientError("no answer", bam.EXIT_UNREACHABLE)] * 3
    with pytest.raises(bam.ClientError, match="lost contact .* the job goes on there") as error:
        client._poll()
    assert error.value.code == bam.EXIT_UNREACHABLE


def test_pack_says_what_managers_with_the_default_limits_refuse():
    entries = [(f"f{i}", bam.REGTYPE, "", os.stat_result((0o644, 0, 0, 1, 0, 0, size, 0, 0, 0)),
                None) for i, size in enumerate([3 << 30, 1 << 20])]
    warnings = bam.pack_limits(entries * 1, 3 << 30)
    assert any("--max-file-mb 2048" in w for w in warnings)
    assert any("--max-download-mb 2048" in w for w in warnings)
    assert bam.pack_limits(entries[1:], 1 << 20) == []


def test_every_address_of_a_name_is_tried(monkeypatch):
    """localhost is ::1 first on Debian; a manager listening on 127.0.0.1 only still answers
    (the review's M5), for the hub's calls and the client alike."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    port = listener.getsockname()[1]
    nobody = socket.socket(socket.AF_INET6)
    try:
        nobody.bind(("::1", 0))
        empty = nobody.getsockname()[1]  # bound, not listening: refused
    except OSError:
        empty = port
    real = socket.getaddrinfo

    def dual(host, *args, **kwargs):
        if host in ("dual.test", b"dual.test"):
            return [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", empty, 0, 0)),
                    (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]
        return real(host, *args, **kwargs)
    monkeypatch.setattr(socket, "getaddrinfo", dual)

    def serve():
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b'HTTP/1.1 200 OK\r\nContent-Length: 15\r\n\r\n{"running": 1}\n')
    threading.Thread(target=serve, daemon=True).start()
    try:
        call = bam.call_agent(f"dual.test:{port}", "GET", "/status", None)
        assert call.status == 200 and call.payload == {"running": 1}, call.error
    finally:
        listener.close()
        nobody.close()


def test_pack_refuses_an_out_folder_inside_the_build(tmp_path):
    build = tmp_path / "build"
    (build / "dist").mkdir(parents=True)
    (build / "package.json").write_text('{"name": "x", "version": "1.0.0"}')
    with pytest.raises(bam.ClientError, match="is inside the build") as error:
        bam.pack_release(str(build), "hub", str(build / "nas"), say=lambda line: None)
    assert error.value.code == bam.EXIT_USAGE and not (build / "nas").exists()


def test_a_token_file_every_user_can_read_is_warned_about(tmp_path):
    import subprocess
    import sys
    token = tmp_path / "token"
    token.write_text("s3cret-token-0123456789\n")
    os.chmod(token, 0o644)
    assert "readable by every user (mode 0644): chmod 600" in bam.token_file_exposed(str(token))
    run = subprocess.run([sys.executable, bam.__file__, "status", "--host", "127.0.0.1:9",
                          "--token-file", str(token)], capture_output=True, text=True,
                         timeout=30)
    assert "warning: the token file" in run.stderr and run.returncode == 4
    os.chmod(token, 0o600)
    assert bam.token_file_exposed(str(token)) is None


def test_the_agent_list_is_fixed_when_the_rollout_begins(tmp_path, made):
    """An agent added to the file while a rollout runs is not in it (the next `target: agents`
    takes it); one removed is still followed to its end."""
    first = manager(made, "127.0.3.1", work=1.0)
    added = manager(made, "127.0.3.2")
    listed = tmp_path / "agents"
    listed.write_text("127.0.3.1\n")
    hub = hub_for(tmp_path, made, agents=f"@{listed}")
    assert hub.request("POST", "/update", {"version": "2.0.11", "target": "agents"})[0] == 200
    time.sleep(0.3)
    listed.write_text("127.0.3.2\n")  # the first removed, another added, mid-rollout
    record = wait_over(hub.rollout)
    assert [(e["agent"], e["state"]) for e in record["agents"]] == [
        ("127.0.3.1:3081", "succeeded")] and record["state"] == "succeeded"
    assert first.posts == ["2.0.11"] and added.posts == []


def test_a_hub_bound_to_all_addresses_knows_itself_and_resolves_its_name_once(monkeypatch):
    settings = type("S", (), {"port": 3081, "bind": "0.0.0.0"})()
    real, asked = socket.getaddrinfo, []

    def counting(host, *args, **kwargs):
        if host == socket.gethostname():
            asked.append(host)
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.9.9.9", 0))]
        return real(host, *args, **kwargs)
    monkeypatch.setattr(socket, "getaddrinfo", counting)
    merged = bam.merge_spellings(["10.0.0.1:3081", "10.0.0.2:3081", "10.9.9.9:3081",
                                  "127.0.0.5:3081", "10.9.9.9:4000"], settings)
    assert [agent for agent, info in merged.items() if info.get("hub")] == [
        "10.9.9.9:3081", "127.0.0.5:3081"]
    assert len(asked) == 1
