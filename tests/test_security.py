"""Safe on a shared network, fast and without root: what a web page's requests (cross-origin,
DNS rebinding) get, the token file failing closed, one manager per state dir, and `check`.
The same with a real browser and the real systemd: test_e2e_browser.py."""

import logging
import os
import socket
import subprocess
import sys
import textwrap

import pytest

import backend_ai_manager as bam
from support import Running

MANAGER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "backend_ai_manager.py")
TOKEN = "s3cret-token-0123456789"
CHANGING = [("POST", "/stop"), ("POST", "/start"), ("POST", "/restart"), ("POST", "/rollback"),
            ("POST", "/update"), ("PUT", "/update"), ("DELETE", "/status")]


# --- the pure decisions -----------------------------------------------------------------------

@pytest.mark.parametrize("content, problem", [
    (b"s3cret-token-0123456789\n", None),
    (b"  s3cret-token-0123456789  \r\n", None),
    (b"", "it is empty"),
    (b"\n \n", "it is empty"),
    (b"short", "the token is 5 characters; at least 16 are needed"),
    (b"s3cret-token 0123456789", "whitespace or control characters"),
    (b"s3cret-token\t0123456789", "whitespace or control characters"),
    (b"s3cret-token-\x070123456789", "whitespace or control characters"),
    ("s3cret-tökén-0123456789".encode(), "non-ASCII"),
    (b"\xff\xfes3cret-token-0123456789", "non-ASCII"),
    (b"x" * 4097, "over 4096"),
])
def test_read_token_file(tmp_path, content, problem):
    path = tmp_path / "token"
    path.write_bytes(content)
    token, found = bam.read_token_file(str(path))
    if problem is None:
        assert (token, found) == ("s3cret-token-0123456789", None)
    else:
        assert token is None and problem in found


def test_read_token_file_cannot_read(tmp_path):
    assert bam.read_token_file(str(tmp_path / "none")) == (
        None, "cannot read it: No such file or directory")
    assert bam.read_token_file(str(tmp_path)) == (None, "cannot read it: Is a directory")


def test_a_bad_token_file_stops_the_start(tmp_path):
    path = tmp_path / "token"
    for content in ("s3cret-tökén-0123456789", "", "short"):
        path.write_text(content)
        with pytest.raises(bam.ConfigError, match="--token-file"):
            settings(tmp_path, token_file=str(path))


@pytest.mark.parametrize("text, expected", [
    ("", frozenset()),
    ("hub.lan, Agent-1.LAN.", frozenset({"hub.lan", "agent-1.lan"})),
    (".fleet.example", frozenset({".fleet.example"})),
    ("*", None),
])
def test_allowed_hosts_parse(text, expected):
    assert bam._allowed_hosts(text) == expected


@pytest.mark.parametrize("text", ["a b", "exa mple.org", "-bad.org", "x..y", "..x", "*.lan",
                                  "a/b", "a:3081", "*,hub"])
def test_allowed_hosts_refuse_what_is_not_a_name(text):
    with pytest.raises(ValueError, match="not a DNS name"):
        bam._allowed_hosts(text)


OWN = frozenset({"localhost", "vm", "vm.lan"})


@pytest.mark.parametrize("host", [
    "", "127.0.0.1", "127.0.0.1:3081", "10.1.2.3:3081", "[::1]:3081", "[::1]", "::1",
    "localhost", "localhost:3081", "LOCALHOST.:3081", "vm", "vm.lan:3081", "hub.lan:3081",
    "x.fleet.example", "a.b.fleet.example:1",
])
def test_host_names_that_pass(host):
    assert bam.host_name_problem(host, OWN, frozenset({"hub.lan", ".fleet.example"})) is None


@pytest.mark.parametrize("host", [
    "rebind.attacker.example:3081", "rebind.attacker.example", "localhost.attacker.example",
    "vm.attacker.example", "fleet.example", "xfleet.example", "hub.lan.attacker.example",
    "127.0.0.1.nip.io:3081", "[::1]x:3081", "evil",
])
def test_host_names_that_are_refused(host):
    problem = bam.host_name_problem(host, OWN, frozenset({"hub.lan", ".fleet.example"}))
    assert "--allowed-hosts" in problem and "is not one of this manager's names" in problem
    assert bam.host_name_problem(host, OWN, None) is None  # --allowed-hosts '*'


def test_own_host_names_come_from_the_hosts_file(tmp_path):
    hostname = socket.gethostname()
    hosts = tmp_path / "hosts"
    hosts.write_text(f"127.0.0.1 localhost\n10.0.0.5 {hostname}.corp.example {hostname}  # me\n"
                     "10.0.0.6 other.corp.example other\n")
    names = bam.own_host_names(str(hosts))
    assert {"localhost", hostname.lower(), f"{hostname}.corp.example".lower()} <= names
    assert "other" not in names and "other.corp.example" not in names and "me" not in names


class FakeRequest:
    def __init__(self, method, **headers):
        self.method = method
        self.headers = {k.replace("_", "-"): v for k, v in headers.items()}

    def header(self, name):
        return self.headers.get(name, "")


@pytest.mark.parametrize("method, headers, refused", [
    ("POST", {}, False),  # curl, the client, a hub
    ("POST", {"host": "127.0.0.1:3081"}, False),
    ("POST", {"sec_fetch_site": "same-origin", "origin": "http://elsewhere"}, False),
    ("POST", {"sec_fetch_site": "none"}, False),  # typed in the address bar
    ("POST", {"sec_fetch_site": "cross-site"}, True),
    ("POST", {"sec_fetch_site": "same-site", "origin": "http://127.0.0.1:3081",
              "host": "127.0.0.1:3081"}, True),
    ("DELETE", {"sec_fetch_site": "cross-site"}, True),
    ("POST", {"origin": "http://127.0.0.1:3081", "host": "127.0.0.1:3081"}, False),
    ("POST", {"origin": "http://127.0.0.2:8000", "host": "127.0.0.1:3081"}, True),
    ("POST", {"origin": "http://127.0.0.1:8000", "host": "127.0.0.1:3081"}, True),
    ("POST", {"origin": "null", "host": "127.0.0.1:3081"}, True),
    ("POST", {"origin": "http://127.0.0.1:3081"}, True),  # no Host to compare with
    ("GET", {"sec_fetch_site": "cross-site", "origin": "http://x"}, False),  # reads nothing
    ("HEAD", {"sec_fetch_site": "cross-site"}, False),
])
def test_cross_origin_decision(method, headers, refused):
    problem = bam.cross_origin_problem(FakeRequest(method, **headers))
    if refused:
        assert problem.startswith("cross-origin request refused: ")
    else:
        assert problem is None


# --- over HTTP, with a stand-in for systemd ---------------------------------------------------

def no_cors_headers(response):
    assert not [k for k in response.keys() if k.lower().startswith("access-control")]


@pytest.mark.parametrize("method, path", CHANGING)
@pytest.mark.parametrize("headers", [
    {"Sec-Fetch-Site": "cross-site", "Origin": "http://127.0.0.2:8000"},
    {"Sec-Fetch-Site": "same-site"},
    {"Origin": "http://127.0.0.2:8000"},
    {"Origin": "null"},
])
def test_cross_origin_requests_are_refused_and_change_nothing(srv, method, path, headers):
    body = b'{"version": "2.0.11"}'
    code, answer, response = srv.request(method, path, body, dict(
        headers, **{"Content-Type": "text/plain"}))
    assert code == 403 and answer["success"] is False
    assert answer["error"].startswith("cross-origin request refused: ")
    no_cors_headers(response)
    assert srv.systemd.calls == [] and srv.updater.view()["state"] == "idle"


def test_same_origin_and_header_less_requests_pass(srv):
    for headers in ({}, {"Sec-Fetch-Site": "same-origin"}, {"Sec-Fetch-Site": "none"},
                    {"Origin": f"http://127.0.0.1:{srv.port}"}):
        code, answer, response = srv.request("POST", "/restart", headers=headers)
        assert code == 200 and answer["success"] is True, answer
        no_cors_headers(response)
    assert srv.systemd.calls == ["restart"] * 4


def test_a_preflight_gets_no_cors_answer(srv):
    code, answer, response = srv.request("OPTIONS", "/update", headers={
        "Origin": "http://127.0.0.2:8000", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type, authorization"})
    assert code in (403, 405) and answer["success"] is False
    no_cors_headers(response)
    code, _, response = srv.request("GET", "/status", headers={"Origin": "http://127.0.0.2"})
    assert code == 200
    no_cors_headers(response)


@pytest.mark.parametrize("method, path", [("GET", "/logs"), ("GET", "/status"), ("HEAD", "/status"),
                                          ("GET", "/update"), ("GET", "/version"),
                                          ("OPTIONS", "/status")] + CHANGING)
@pytest.mark.parametrize("host", ["rebind.attacker.example:{port}", "rebind.attacker.example",
                                  "localhost.attacker.example:{port}"])
def test_foreign_host_names_are_refused_on_every_method(srv, method, path, host):
    code, answer, response = srv.request(method, path, b"{}", {"Host": host.format(
        port=srv.port)})
    assert code == 403
    if method != "HEAD":
        assert "--allowed-hosts" in answer["error"] and "rebind" not in str(answer).replace(
            answer["error"], "")
    assert srv.systemd.calls == []
    no_cors_headers(response)


def test_allowed_host_forms_pass(tmp_path):
    hostname = socket.gethostname()
    with Running(tmp_path, allowed_hosts="hub.lan,.fleet.example") as running:
        for host in ("127.0.0.1:{port}", "127.0.0.1", "localhost:{port}", "LocalHost.",
                     f"{hostname}:{{port}}", "hub.lan:{port}", "HUB.LAN",
                     "agent-7.fleet.example:{port}", "[::1]:{port}"):
            code, answer, _ = running.request("GET", "/logs?lines=1", headers={
                "Host": host.format(port=running.port)})
            assert code == 200, (host, answer)
        code, _, _ = running.request("GET", "/logs", headers={"Host": "fleet.example.attacker"})
        assert code == 403
    (tmp_path / "star").mkdir()
    with Running(tmp_path / "star", allowed_hosts="*") as running:
        code, _, _ = running.request("GET", "/logs", headers={"Host": "anything.example"})
        assert code == 200


def test_a_request_without_host_passes_and_two_host_headers_are_refused(srv):
    answer = srv.raw(b"GET /status HTTP/1.0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 ")
    answer = srv.raw(b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: evil.example\r\n"
                     b"Connection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 ") and b"more than one Host header" in answer


BROKEN_TOKENS = [
    ("emptied", lambda p: p.write_bytes(b""), "it is empty"),
    ("truncated mid-rotation", lambda p: p.write_bytes(b"n3w-tok"), "the token is 7 characters"),
    ("removed", lambda p: p.unlink(), "cannot read it: No such file or directory"),
    ("a directory", lambda p: (p.unlink(), p.mkdir()), "cannot read it: Is a directory"),
    ("too short", lambda p: p.write_bytes(b"12345\n"), "the token is 5 characters"),
    ("non-ASCII", lambda p: p.write_bytes("s3cret-tökén-0123456789".encode()), "non-ASCII"),
    ("whitespace", lambda p: p.write_bytes(b"s3cret token 0123456789"), "whitespace"),
]


@pytest.mark.parametrize("name, breaks, problem", BROKEN_TOKENS, ids=[b[0] for b in BROKEN_TOKENS])
def test_a_broken_token_file_closes_the_manager(tmp_path, caplog, name, breaks, problem):
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    old = {"Authorization": f"Bearer {TOKEN}"}
    caplog.set_level(logging.INFO, logger="backend-ai-manager")
    with Running(tmp_path, token_file=str(path)) as running:
        assert running.request("GET", "/status", headers=old)[0] == 200
        breaks(path)
        for method, path_ in [("GET", "/status"), ("GET", "/logs"), ("HEAD", "/status")] + CHANGING:
            for headers in (old, {}, {"Authorization": "Bearer "}):
                code, answer, response = running.request(method, path_, b"{}", headers)
                assert code == 401, (method, path_, answer)
                assert response.get("WWW-Authenticate", "").startswith("Bearer")
                if method != "HEAD":
                    assert answer["error"].startswith(f"the token file {path} (--token-file) "
                                                      "is not valid: ")
                    assert problem in answer["error"] and "refused until it is fixed" in \
                        answer["error"]
        assert running.systemd.calls == [] and running.updater.view()["state"] == "idle"
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1 and problem in errors[0].getMessage()
        # A rotation to a valid token works at once: the new token in, the old one out.
        if path.is_dir():
            path.rmdir()
        path.write_text("n3w-token-9876543210-abcdef\n")
        new = {"Authorization": "Bearer n3w-token-9876543210-abcdef"}
        assert running.request("POST", "/restart", headers=new)[0] == 200
        assert running.request("POST", "/restart", headers=old)[0] == 401
        assert running.systemd.calls == ["restart"]
        infos = [r.getMessage() for r in caplog.records if "is valid again" in r.getMessage()]
        assert len(infos) == 1
        assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 1


def test_the_client_refuses_a_bad_token_file(tmp_path):
    path = tmp_path / "token"
    path.write_text("short\n")
    run = subprocess.run([sys.executable, MANAGER, "status", "--host", "127.0.0.1:9",
                          "--token-file", str(path)], capture_output=True, text=True, timeout=30)
    assert run.returncode == 2
    assert f"--token-file {path} is not valid: the token is 5 characters" in run.stderr


# --- one manager per state dir, and `check` ---------------------------------------------------

def settings(tmp_path, **values):
    values = dict({"role": "agent", "install_dir": str(tmp_path / "install"),
                   "state_dir": str(tmp_path / "state")}, **values)
    return bam.resolve_settings({name: values.get(name) for name, *_ in bam.OPTIONS}, {})


HOLD = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, sys.argv[1])
    import backend_ai_manager as bam
    fd = bam.lock_state_dir(sys.argv[2])
    print("held", flush=True)
    time.sleep(60)
""")


def hold_lock(state_dir):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, os.path.dirname(MANAGER),
                               str(state_dir)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    return holder


def test_the_state_dir_lock_names_its_holder(tmp_path):
    state = tmp_path / "state"
    holder = hold_lock(state)
    try:
        with pytest.raises(bam.StateDirLocked) as error:
            bam.lock_state_dir(str(state))
        assert f"another manager (PID {holder.pid}) holds the lock {state}/lock" in \
            error.value.message
        assert bam.lock_holder(str(state)) == holder.pid
    finally:
        holder.kill()
        holder.wait()
    assert bam.lock_holder(str(state)) is None
    fd = bam.lock_state_dir(str(state))  # the lock goes with its process
    try:
        assert (state / "lock").read_text() == f"{os.getpid()}\n"
    finally:
        os.close(fd)


def test_a_second_serve_exits_at_once_and_touches_nothing(tmp_path):
    state = tmp_path / "state"
    install = tmp_path / "install"
    install.mkdir()
    (install / "package.json").write_text('{"name": "x", "version": "1.0.0"}')
    holder = hold_lock(state)
    try:
        # An interrupted job in the state dir: a serve that ran recovery would change it.
        (state / "job.json").write_text('{"state": "downloading", "version": "1.0.1"}')
        (state / "staging").mkdir()
        before = sorted(os.listdir(state))
        run = subprocess.run(
            [sys.executable, MANAGER, "serve", "--role", "agent", "--install-dir", str(install),
             "--state-dir", str(state), "--port", "1", "--service", "nothing-here.service"],
            capture_output=True, text=True, timeout=30, env=dict(os.environ, PATH="/nonexistent"))
        assert run.returncode == 1
        lines = run.stderr.strip().splitlines()
        assert len(lines) == 1 and f"(PID {holder.pid}) holds the lock {state}/lock" in lines[0]
        assert sorted(os.listdir(state)) == before
        assert (state / "job.json").read_text() == '{"state": "downloading", "version": "1.0.1"}'
    finally:
        holder.kill()
        holder.wait()


def run_check(*args, env=None):
    return subprocess.run([sys.executable, MANAGER, "check", *args], capture_output=True,
                          text=True, timeout=30, env=dict(os.environ, **(env or {})))


def test_check_prints_the_settings_and_where_each_came_from(tmp_path):
    state = tmp_path / "state"
    run = run_check("--role", "hub", "--state-dir", str(state), "--port", "3999",
                    "--agents", "127.0.2.1,127.0.2.2:4000",
                    env={"BACKEND_AI_ALLOWED_HOSTS": "hub.lan"})
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert any(line.split()[:2] == ["--port", "3999"] and "(command line)" in line
               for line in lines)
    assert any(line.split()[:2] == ["--allowed-hosts", "hub.lan"] and
               "(BACKEND_AI_ALLOWED_HOSTS)" in line for line in lines)
    assert any(line.split()[:2] == ["--settle", "5"] and "(default)" in line for line in lines)
    assert any(line.startswith("--agents ") for line in lines)
    assert lines[-1] == f"settings are valid; the state dir {state} is not in use"
    assert not state.exists()  # touched nothing
    agent = run_check("--role", "agent", "--state-dir", str(state))
    assert agent.returncode == 0 and "--agents" not in agent.stdout  # hub-only: not shown


def test_check_says_who_holds_the_state_dir(tmp_path):
    state = tmp_path / "state"
    holder = hold_lock(state)
    try:
        run = run_check("--role", "agent", "--state-dir", str(state))
        assert run.returncode == 0
        assert run.stdout.splitlines()[-1] == (
            f"settings are valid; the state dir {state} is in use by the manager with PID "
            f"{holder.pid}")
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("args, env, message", [
    (["--role", "agent", "--agents", "127.0.0.2"], {},
     "--agents (command line) is a hub setting; an agent does not take it"),
    (["--port", "70000"], {}, "--port"),
    (["--allowed-hosts", "bad name"], {}, "'bad name' is not a DNS name"),
    ([], {"BACKEND_AI_SETTLE": "soon"}, "BACKEND_AI_SETTLE"),
    (["--token-file", "/nonexistent/token"], {}, "cannot read it"),
    (["--role", ""], {}, "argument --role: invalid choice: ''"),
])
def test_check_refuses_bad_settings_with_exit_2(tmp_path, args, env, message):
    run = run_check("--role", "hub", "--state-dir", str(tmp_path / "state"), *args, env=env)
    assert run.returncode == 2 and run.stdout == ""
    assert message in run.stderr and len(run.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "state").exists()
