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
from support import Running


class FakeAgent:
    """A listener on (address, 3081) answering every connection with `behaviour`."""

    def __init__(self, address, behaviour, version="2.0.10", token=None):
        self.address, self.behaviour, self.version, self.token = address, behaviour, version, token
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
            if self.behaviour == "silent":
                self.stop.wait(30)
                return
            if self.behaviour == "trickle":
                for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}":
                    if self.stop.wait(0.5):
                        return
                    conn.sendall(bytes([byte]))
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
                                   "version": self.version,
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
        "127.0.2.2:3081": FakeAgent("127.0.2.2", "good", token="agent-token-0123456789"),
        "127.0.2.3:3081": FakeAgent("127.0.2.3", "good", "2.0.11",
                                    token="agent-token-0123456789"),
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
        "hub_version": "2.0.10", "skew": ["127.0.2.3:3081"]}


def test_the_agent_token_goes_to_agents(fleet):
    running, agents, _ = fleet
    running.request("GET", "/agents")
    assert b"Authorization: Bearer agent-token-0123456789" in agents["127.0.2.1:3081"].requests[0]


def test_an_agent_list_file_is_read_again_at_each_request(fleet):
    running, agents, listed = fleet
    listed.write_text("127.0.2.1\n127.0.2.2:3081  # the port may be left out\n")
    code, body, _ = running.request("GET", "/agents")
    assert [e["agent"] for e in body["agents"]] == ["127.0.2.1:3081", "127.0.2.2:3081"]
    listed.write_text("127.0.2.1:3081, 127.0.2.3:3081\n")
    code, body, _ = running.request("GET", "/agents")
    assert [e["agent"] for e in body["agents"]] == ["127.0.2.1:3081", "127.0.2.3:3081"]
    listed.write_text("not an agent!\n")
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
