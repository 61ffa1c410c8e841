"""End to end: safe on a shared network. The real manager (systemd/ai-hub-manager.service under
Debian's /usr/bin/python3) in the systemd sandbox, controlling the example service, and:

- a real browser, Debian's Chromium (headless), opening a page served from another loopback
  address that tries every "simple" request a page can send without asking (form posts in each
  encoding, fetch with mode no-cors, sendBeacon) against the manager, by address (the browser
  sends Sec-Fetch-Site) and by a name the manager accepts (it sends only Origin);
- DNS rebinding: the browser, with the attacker's name resolved to the manager, reads nothing;
  foreign Host names refused on every method from curl, the allowed forms answered;
- the token file failing closed on the real manager, with one ERROR line in the journal;
- one manager per state dir: a second `serve` by hand during a slow update exits 1 at once and
  changes nothing, on the same port and on another; the update ends `succeeded`, byte for byte.

(test_security.py has the same rules over HTTP without root, test_e2e_fleet.py the lock on a
hub mid-rollout.)
"""

import json
import os
import random
import re
import shutil
import subprocess
import threading
import time
import http.server

import pytest

from support import Host, http_call

PYTHON = "/usr/bin/python3"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
NAME = "manager.test"  # the name the manager is reached by: in its --allowed-hosts
ATTACKER = "attacker.test"  # the page's site, on 127.0.0.2
REBIND = "rebind.attacker.example"  # the attacker's name, re-pointed at the manager
TOKEN = "network-token-0123456789abcdef"


def need_chromium():
    if not os.access(CHROMIUM, os.X_OK):
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but chromium is missing (.ci/run installs it)")
        pytest.skip("chromium is not installed (apt-get install chromium)")


@pytest.fixture(scope="module")
def host(sandbox, nas, work_dir):
    base = os.path.join(work_dir, "shared-network")
    os.makedirs(base)
    host = Host(sandbox, base, nas, python=PYTHON, settle=0.5,
                env={"BACKEND_AI_ALLOWED_HOSTS": NAME})
    host.install_base("2.0.10")
    host.publish("2.0.11")  # what the page asks for: it would install if the page got through
    host.start()
    try:
        yield host
    finally:
        host.stop()
        shutil.rmtree(base, ignore_errors=True)


def journal_lines(host):
    """The manager unit's journal messages (the whole journal: see post_update_counts in
    test_e2e_fleet.py for why not --after-cursor)."""
    out = host.sandbox.run(["journalctl", "-u", host.MANAGER_UNIT, "-o", "json",
                            "--no-pager"]).stdout
    lines = []
    for line in out.splitlines():
        entry = json.loads(line)
        message = entry.get("MESSAGE")
        if isinstance(message, list):
            message = bytes(message).decode("utf-8", "replace")
        lines.append((entry.get("PRIORITY"), message or ""))
    return lines


# --- a web page against the manager -----------------------------------------------------------

PAGE = """<!doctype html>
<html><body>
<iframe name="f1"></iframe><iframe name="f2"></iframe><iframe name="f3"></iframe>
<iframe name="f4"></iframe>
<form id="urlencoded" target="f1" method="POST" action="{manager}/restart">
  <input name="x" value="1"></form>
<form id="multipart" target="f2" method="POST" enctype="multipart/form-data"
  action="{manager}/stop"><input name="x" value="1"></form>
<form id="text" target="f3" method="POST" enctype="text/plain" action="{manager}/update">
  <input name='{{"version": "2.0.11", "pad": "' value='"}}'></form>
<form id="by-name" target="f4" method="POST" action="{named}/restart">
  <input name="x" value="1"></form>
<pre id="out"></pre>
<script>
const out = document.getElementById("out");
const say = (text) => {{ out.textContent += text + "\\n"; }};
for (const id of ["urlencoded", "multipart", "text", "by-name"])
  document.getElementById(id).submit();
const simple = {{method: "POST", mode: "no-cors", headers: {{"Content-Type": "text/plain"}},
                body: '{{"version": "2.0.11"}}'}};
navigator.sendBeacon("{manager}/restart", new Blob(['{{}}'], {{type: "text/plain"}}));
navigator.sendBeacon("{named}/stop", new Blob(['{{}}'], {{type: "text/plain"}}));
Promise.allSettled([
  fetch("{manager}/update", simple), fetch("{manager}/stop", simple),
  fetch("{named}/update", simple),
  fetch("{manager}/logs").then(r => r.text()).then(t => say("READ " + t),
                                                   e => say("cannot read /logs")),
]).then(() => say("done"));
</script>
</body></html>
"""
CHANGING_REQUESTS = 9  # the page's POSTs: 4 forms, 2 beacons, 3 fetches


class PageServer:
    """The attacker's site: `page` at http://attacker.test:PORT/ (127.0.0.2)."""

    def __init__(self, page):
        body = page.encode()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.2", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def chromium(tmp_path, url, budget_ms=5000):
    """Open `url` in headless Chromium, names mapped as in a LAN with a rebinding attacker;
    the DOM once the page settled."""
    rules = f"MAP {NAME} 127.0.0.1, MAP {ATTACKER} 127.0.0.2, MAP {REBIND} 127.0.0.1"
    run = subprocess.run(
        [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
         f"--user-data-dir={tmp_path}/chromium", f"--host-resolver-rules={rules}",
         f"--virtual-time-budget={budget_ms}", "--dump-dom", url],
        capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout


def test_a_web_page_cannot_act_on_the_manager(host, tmp_path):
    need_chromium()
    pid, version = host.main_pid(), host.api("GET", "/version")[1]["version"]
    assert version == "2.0.10"
    before = len(journal_lines(host))
    page = PageServer(PAGE.format(manager=f"http://127.0.0.1:{host.port}",
                                  named=f"http://{NAME}:{host.port}"))
    try:
        dom = chromium(tmp_path, f"http://{ATTACKER}:{page.port}/")
    finally:
        page.close()
    said = re.search(r'<pre id="out">(.*?)</pre>', dom, re.S).group(1).split("\n")
    assert said == ["cannot read /logs", "done", ""], dom[-1500:]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the beacons may still be on their way
        refused = [m for _, m in journal_lines(host)[before:]
                   if " 403 " in m and "cross-origin request refused" in m]
        if len(refused) >= CHANGING_REQUESTS:
            break
        time.sleep(0.2)
    print("\n" + "\n".join(refused))
    assert len(refused) == CHANGING_REQUESTS, refused
    assert sum("Sec-Fetch-Site is 'cross-site'" in m for m in refused) == 6  # by address
    assert sum(f"Origin 'http://{ATTACKER}:{page.port}' is not this manager" in m
               for m in refused) == 3  # by name: the browser sends Origin, no Sec-Fetch-Site
    assert host.main_pid() == pid and host.is_active() == "active"
    status, record = host.api("GET", "/update")
    assert record["state"] == "idle", record
    host.assert_installed("2.0.10")
    assert not [m for _, m in journal_lines(host)[before:] if '" 200 ' in m and "POST" in m]


def test_a_rebound_name_reads_nothing_and_the_allowed_name_works(host, tmp_path):
    need_chromium()
    dom = chromium(tmp_path, f"http://{REBIND}:{host.port}/logs", budget_ms=2000)
    assert "is not one of this manager's names" in dom and "--allowed-hosts" in dom, dom
    assert '"logs"' not in dom
    dom = chromium(tmp_path, f"http://{NAME}:{host.port}/version", budget_ms=2000)
    assert '"version": "2.0.10"' in dom, dom


def curl(host, *args):
    run = subprocess.run(["curl", "-sS", "-o", "-", "-w", "\n%{http_code}", *args],
                         capture_output=True, text=True, timeout=30)
    body, _, code = run.stdout.rpartition("\n")
    return int(code), body


@pytest.mark.parametrize("method", ["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS"])
def test_foreign_host_names_are_refused_on_every_method(host, method):
    pid = host.main_pid()
    for name in (REBIND, f"localhost.{REBIND}", f"{NAME}.{REBIND}"):
        args = ["-X", method] if method != "HEAD" else ["-I"]
        code, body = curl(host, *args, "--resolve", f"{name}:{host.port}:127.0.0.1",
                          f"http://{name}:{host.port}/stop")
        assert code == 403, (name, body)
        if method != "HEAD":
            assert "--allowed-hosts" in json.loads(body)["error"]
    assert host.main_pid() == pid


def test_the_allowed_forms_pass(host):
    import socket
    hostname = socket.gethostname()
    for url, resolve in ((f"http://127.0.0.1:{host.port}/status", None),
                         (f"http://localhost:{host.port}/status", None),
                         (f"http://{hostname}:{host.port}/status", hostname),
                         (f"http://{NAME}:{host.port}/status", NAME),
                         (f"http://{NAME.upper()}.:{host.port}/status", NAME.upper() + ".")):
        args = ["--resolve", f"{resolve}:{host.port}:127.0.0.1"] if resolve else []
        code, body = curl(host, *args, url)
        assert code == 200 and json.loads(body)["running"] is True, (url, body)
    # The client, by name, and a POST from curl (no browser headers): not affected.
    run = subprocess.run([PYTHON, host.manager, "status", "--host", f"localhost:{host.port}"],
                         capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stderr
    pid = host.main_pid()
    code, body = curl(host, "-X", "POST", f"http://127.0.0.1:{host.port}/restart")
    assert code == 200 and json.loads(body)["success"] is True
    assert host.main_pid() != pid


# --- the token fails closed -------------------------------------------------------------------

def test_a_broken_token_file_closes_the_real_manager(host):
    token = os.path.join(host.base, "token")
    with open(token, "w") as f:
        f.write(TOKEN + "\n")
    host.restart_manager(BACKEND_AI_TOKEN_FILE=token)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    try:
        assert host.api("GET", "/status", headers=auth)[0] == 200
        pid = host.main_pid()
        for breaks in (b"", b"n3w-tok", "n3w-tökén-0123456789abc".encode(), b"short\n"):
            before = len(journal_lines(host))
            with open(token, "wb") as f:
                f.write(breaks)
            for method, path in (("GET", "/status"), ("GET", "/logs"), ("POST", "/stop"),
                                 ("POST", "/update")) * 3:
                for headers in (auth, {}):
                    status, body = host.api(method, path, {"version": "2.0.11"}, headers)
                    assert status == 401 and "is not valid" in body["error"], (breaks, body)
            errors = [m for p, m in journal_lines(host)[before:] if p == "3"]
            assert len(errors) == 1 and f"the token file {token} (--token-file) is not valid" \
                in errors[0], errors
            rotated = f"rotated-{len(breaks)}-0123456789abcdef"
            with open(token, "w") as f:
                f.write(rotated + "\n")
            auth = {"Authorization": f"Bearer {rotated}"}
            assert host.api("GET", "/status", headers=auth)[0] == 200  # at once
        assert host.main_pid() == pid
        assert host.api("GET", "/update", headers=auth)[1]["state"] == "idle"
    finally:
        host.restart_manager()


# --- one manager per state dir ----------------------------------------------------------------

def test_a_second_serve_during_an_update_changes_nothing(host, nas):
    blob = random.Random(20).randbytes(3 * 1024 * 1024 + 4099)  # crosses every buffer
    host.publish("2.0.12", extra={"dist/blob.bin": blob})
    nas.faults[nas.path_of("2.0.12")] = "throttle:1000000"  # about 3 s of downloading
    manager_pid, service_pid = host.manager_pid(), host.main_pid()
    status, body = host.api("POST", "/update", {"version": "2.0.12"})
    assert status == 200, body
    deadline = time.monotonic() + 20
    while host.api("GET", "/update")[1]["state"] != "downloading":
        assert time.monotonic() < deadline, "the update never started downloading"
        time.sleep(0.05)
    staging = sorted(os.listdir(host.state_dir))
    for env in ({}, {"BACKEND_AI_PORT": str(host.port + 1)}):  # the port taken, and another
        code, took, stderr = host.serve_by_hand(**env)
        lines = stderr.strip().splitlines()
        assert code == 1 and len(lines) == 1, stderr
        assert f"another manager (PID {manager_pid}) holds the lock {host.state_dir}/lock" \
            in lines[0]
        print(f"\nsecond serve ({env or 'same port'}): exit {code} in {took:.2f} s: {lines[0]}")
        record = host.api("GET", "/update")[1]
        assert record["state"] == "downloading", record  # not taken for an interrupted one
        assert sorted(os.listdir(host.state_dir)) == staging
        assert host.main_pid() == service_pid  # no systemctl
    record = host.wait_update(120)
    assert record["state"] == "succeeded", record
    assert not [line for line in record["log"] if "interrupted" in line]
    host.assert_installed("2.0.12")  # every file, byte for byte, against GNU tar
    assert host.manager_pid() == manager_pid
    nas.faults.pop(nas.path_of("2.0.12"))
