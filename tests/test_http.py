"""The HTTP layer on a real server on port 0, with a stand-in for systemd (the end-to-end tests
use the real one): routing, the error table, body rules, access control; and the update job's
logic, fast and without root: the health gate, automatic rollback, /rollback, and recovery
after a crash in each phase."""

import json
import os
import shutil
import threading
import time

import pytest

import backend_ai_manager as bam
from support import FakeSystemd, Nas, Running, release_files


def test_seed_formats(srv):
    status, body, _ = srv.request("GET", "/status")
    assert status == 200 and body["running"] is True
    assert body["version"] == "2.0.10" and body["update"]["state"] == "idle"
    assert body["since"] == "2026-11-27T21:00:05Z" and body["main_pid"] == 42
    for action in ("stop", "start", "restart"):
        status, body, _ = srv.request("POST", f"/{action}")
        assert status == 200 and body["success"] is True
    assert srv.systemd.calls == ["stop", "start", "restart"]
    status, body, _ = srv.request("GET", "/version")
    assert (status, body) == (200, {"version": "2.0.10", "name": "@proxmox-ai-control/hub"})
    status, body, _ = srv.request("GET", "/logs?lines=3")
    assert status == 200 and body == {"service": "ai-hub.service", "lines": 3,
                                      "logs": "line 0\nline 1\nline 2"}
    status, body, _ = srv.request("GET", "/logs")
    assert body["lines"] == 50


def test_hand_edit_of_package_json_is_seen_by_the_next_status(srv):
    """/status caches package.json by its stat(), never beyond a change: an edit in place of
    the same size (same inode) within the same second, a replacement, and a removal."""
    path = os.path.join(srv.server.settings.install_dir, "package.json")
    assert srv.request("GET", "/status")[1]["version"] == "2.0.10"
    with open(path, "r+b") as f:  # same inode, same size
        text = f.read()
        f.seek(0)
        f.write(text.replace(b"2.0.10", b"2.0.19"))
    assert srv.request("GET", "/status")[1]["version"] == "2.0.19"
    assert srv.request("GET", "/version")[1]["version"] == "2.0.19"
    with open(path + ".new", "w") as f:  # a new file over the old one
        json.dump({"name": "@proxmox-ai-control/hub", "version": "2.0.20"}, f)
    os.replace(path + ".new", path)
    assert srv.request("GET", "/status")[1]["version"] == "2.0.20"
    os.unlink(path)
    body = srv.request("GET", "/status")[1]
    assert body["version"] is None and "does not exist" in body["version_error"]


def test_start_and_stop_say_whether_anything_changed(srv):
    _, body, _ = srv.request("POST", "/start")
    assert body["changed"] is False and body["active_state"] == "active"
    _, body, _ = srv.request("POST", "/stop")
    assert body["changed"] is True and body["active_state"] == "inactive"


@pytest.mark.parametrize("method, path, status", [
    ("GET", "/nope", 404), ("GET", "/status/", 404), ("POST", "/", 404),
    ("POST", "/status", 405), ("GET", "/start", 405), ("DELETE", "/update", 405),
    ("PUT", "/logs", 405), ("BREW", "/status", 405),
])
def test_unknown_paths_and_wrong_methods(srv, method, path, status):
    code, body, response = srv.request(method, path)
    assert code == status and body["success"] is False and body["error"]
    if status == 405:
        assert response.get("Allow")
        assert method not in response.get("Allow")
    assert srv.systemd.calls == []


@pytest.mark.parametrize("body, words", [
    (b"not json", "not valid JSON"), (b"[1]", "JSON object"), (b"{}", "invalid version"),
    (b'{"version": "../../etc"}', "invalid version"), (b'{"version": 2}', "invalid version"),
    (b'{"version": "' + b"1" * 100 + b'"}', "invalid version"), (b"\xff\xfe", "not valid JSON"),
])
def test_bad_update_requests_are_400_and_change_nothing(srv, body, words):
    code, answer, _ = srv.request("POST", "/update", body=body)
    assert code == 400 and words in answer["error"]
    assert srv.updater.view()["state"] == "idle"


@pytest.mark.parametrize("query", ["lines=0", "lines=abc", "lines=-5", "lines=1_0", "lines=99999",
                                   "lines=5&lines=6", "lines=", "lines=%EF%BC%95"])
def test_bad_lines_are_400(srv, query):
    code, body, _ = srv.request("GET", f"/logs?{query}")
    assert code == 400 and "lines" in body["error"]


def test_body_over_the_limit_is_413(srv):
    code, body, _ = srv.request("POST", "/update", body=b"{" + b" " * 10000 + b"}")
    assert code == 413 and "limit" in body["error"]


def test_systemctl_failures_carry_systemds_message(srv):
    srv.systemd.fail = bam.SystemdError("'systemctl start ai-hub.service' failed: Job for "
                                        "ai-hub.service failed because the control process exited")
    code, body, _ = srv.request("POST", "/start")
    assert code == 500 and "Job for ai-hub.service failed" in body["error"]
    srv.systemd.fail = bam.SystemdError("'systemctl stop ai-hub.service' timed out", timed_out=True)
    code, body, _ = srv.request("POST", "/stop")
    assert code == 504 and "timed out" in body["error"]


def test_missing_or_broken_package_json_is_a_clear_error(srv, tmp_path):
    pkg = tmp_path / "install" / "package.json"
    pkg.write_text("{broken")
    code, body, _ = srv.request("GET", "/version")
    assert code == 500 and "not valid JSON" in body["error"]
    pkg.unlink()
    code, body, _ = srv.request("GET", "/version")
    assert code == 500 and "does not exist" in body["error"]
    code, body, _ = srv.request("GET", "/status")
    assert code == 200 and body["version"] is None and "does not exist" in body["version_error"]


def test_transfer_encoding_is_refused_and_pipelined_request_is_not_smuggled(srv):
    answer = srv.raw(b"POST /update HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"0\r\n\r\nPOST /stop HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n")
    assert answer.count(b"HTTP/1.1 ") == 1 and b" 400 " in answer.split(b"\r\n")[0]
    assert srv.systemd.calls == []
    for bad in (b"Content-Length: +5", b"Content-Length: 1_0", b"Content-Length: 5\r\n"
                b"Content-Length: 5"):
        answer = srv.raw(b"POST /update HTTP/1.1\r\nHost: 127.0.0.1\r\n" + bad + b"\r\n\r\nhello")
        assert answer.split(b"\r\n")[0].endswith(b"400 Bad Request"), answer
    assert srv.systemd.calls == []


@pytest.mark.parametrize("bad_line", [
    b"Transfer-Encoding : chunked",          # the framer strips the space, the parser refuses it
    b"X: a\rContent-Length: 999",            # a lone CR inside a line
    b"Content-Length: 99999999999\r\nNo colon here",
])
def test_a_bad_header_line_closes_the_connection_so_nothing_is_smuggled(srv, bad_line):
    """A head the parser refuses is answered 400 and the connection closed, whatever the framer
    made of it: the bytes after it are never read as a second request."""
    answer = srv.raw(b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\n" + bad_line + b"\r\n\r\n"
                     b"POST /stop HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n")
    assert answer.count(b"HTTP/1.1 ") == 1, answer
    assert answer.split(b"\r\n")[0].endswith(b"400 Bad Request") or \
        answer.split(b"\r\n")[0].endswith(b"413 Content Too Large"), answer
    assert b"Connection: close" in answer, answer
    assert srv.systemd.calls == []


def test_a_request_waiting_for_a_lock_does_not_hold_up_the_others(srv):
    """While the update record is locked (a job saving it), GET /status waits in a worker;
    the connection thread goes on answering everyone else."""
    done = {}

    def status():
        done["status"] = srv.request("GET", "/status")[0]

    with srv.updater.job.lock:
        waiting = threading.Thread(target=status)
        waiting.start()
        time.sleep(0.3)
        assert "status" not in done  # it is waiting for the lock
        started = time.monotonic()
        assert srv.request("GET", "/version")[0] == 200
        assert srv.request("GET", "/nope")[0] == 404
        answered_in = time.monotonic() - started
        assert "status" not in done
    waiting.join(10)
    assert done.get("status") == 200
    assert answered_in < 2, f"other requests waited {answered_in:.1f} s for the locked one"


def test_a_body_is_read_exactly_so_keep_alive_works(srv):
    body = b'{"version": "../x"}'
    two = (b"POST /update HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n%s"
           b"GET /version HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n") % (len(body), body)
    answer = srv.raw(two)
    assert answer.count(b"HTTP/1.1 400") == 1 and answer.count(b"HTTP/1.1 200") == 1


def test_token_and_allow_list(tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret-token-0123456789\n")
    running = Running(tmp_path, token_file=str(token))
    try:
        for method, path in (("GET", "/status"), ("POST", "/stop"), ("GET", "/logs")):
            code, body, response = running.request(method, path)
            assert code == 401 and response.get("WWW-Authenticate").startswith("Bearer")
            code, _, _ = running.request(method, path, headers={
                "Authorization": "Bearer s3cret-token-0123456789"})
            assert code == 200
            code, _, _ = running.request(method, path, headers={
                "Authorization": "Bearer s3cret-token-0123456780"})  # same length, wrong
            assert code == 401
        assert running.systemd.calls == ["stop"]
    finally:
        running.close()
    (tmp_path / "b").mkdir()
    running = Running(tmp_path / "b", allow="10.0.0.0/8")
    try:
        code, body, _ = running.request("GET", "/status")
        assert code == 403 and "allow list" in body["error"]
        code, body, _ = running.request("POST", "/stop")
        assert code == 403 and running.systemd.calls == []
    finally:
        running.close()


def test_update_conflicts_and_control_refused_while_an_update_runs(tmp_path):
    with Nas(str(tmp_path / "nas")) as nas, \
            Running(tmp_path, nas_url=nas.url_template(), download_timeout="3") as running:
        # A kept release first, so that a rollback is refused for the running update alone.
        nas.publish("2.0.11", release_files("2.0.11"))
        assert running.request("POST", "/update", {"version": "2.0.11"})[0] == 200
        assert running.wait_update(20)["state"] == "succeeded"
        calls = list(running.systemd.calls)
        nas.publish("2.0.12", release_files("2.0.12"))
        nas.faults[nas.path_of("2.0.12")] = "hang"
        code, body, _ = running.request("POST", "/update", {"version": "2.0.12"})
        assert code == 200 and body["message"] == "Hub update to version 2.0.12 started"
        code, body, _ = running.request("POST", "/update", {"version": "2.0.13"})
        assert code == 409 and "already running" in body["error"]
        for action in ("start", "stop", "restart"):
            code, body, _ = running.request("POST", f"/{action}")
            assert code == 409 and body["error"] == (
                f"cannot {action} ai-hub.service while an update is running"), body
        code, body, _ = running.request("POST", "/rollback")
        assert code == 409 and body["error"] == (
            "an update to version 2.0.12 is already running (downloading)"), body
        assert running.systemd.calls == calls
        running.wait_update(40)
        code, body, _ = running.request("GET", "/update")
        assert body["state"] == "failed", body
        assert "timed out" in body["error"] or "deadline" in body["error"], body


def test_require_checksum_refuses_a_release_without_one(tmp_path):
    with Nas(str(tmp_path / "nas")) as nas, \
            Running(tmp_path, nas_url=nas.url_template(), require_checksum=True) as running:
        nas.publish("2.0.11", release_files("2.0.11"), checksum=False)
        assert running.request("POST", "/update", {"version": "2.0.11"})[0] == 200
        record = running.wait_update(20)
        assert record["state"] == "failed" and "--require-checksum" in record["error"], record
        assert nas.requests == ["/api/raw/2.0.11/hub-2.0.11.tar.gz.sha256"]  # tarball not fetched
        assert running.systemd.calls == []


def test_first_install_on_an_empty_host(tmp_path):
    with Nas(str(tmp_path / "nas")) as nas, \
            Running(tmp_path, nas_url=nas.url_template()) as running:
        (tmp_path / "install" / "package.json").unlink()
        nas.publish("2.0.11", release_files("2.0.11"))
        assert running.request("POST", "/update", {"version": "2.0.11"})[0] == 200
        record = running.wait_update(20)
        assert record["state"] == "succeeded" and record["from_version"] is None, record
        assert running.request("GET", "/version")[1]["version"] == "2.0.11"
        assert running.systemd.calls == ["restart"]


def test_no_smuggling_past_a_401_or_through_a_folded_header(tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret-token-0123456789\n")
    running = Running(tmp_path, token_file=str(token))
    try:
        answer = running.raw(b"POST /update HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 99999\r\n\r\n"
                             b"GET /version HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert answer.count(b"HTTP/1.1 ") == 1 and b" 413 " in answer.split(b"\r\n")[0]
        auth = b"Authorization: Bearer s3cret-token-0123456789\r\n"
        answer = running.raw(b"POST /stop HTTP/1.1\r\nHost: 127.0.0.1\r\n" + auth +
                             b"X-A: a\r\n Transfer-Encoding: chunked\r\n\r\n"
                             b"GET /version HTTP/1.1\r\nHost: 127.0.0.1\r\n" + auth + b"\r\n")
        assert answer.count(b"HTTP/1.1 ") == 1 and b" 400 " in answer.split(b"\r\n")[0]
        assert running.systemd.calls == []
    finally:
        running.close()


def test_a_bad_member_fails_at_once_even_if_the_nas_then_stalls(tmp_path):
    """The error is known from the first member; a NAS that then stalls must not hold the job
    (nor its record) until the per-read timeout."""
    import io
    import tarfile
    with Nas(str(tmp_path / "nas")) as nas, \
            Running(tmp_path, nas_url=nas.url_template(), download_timeout="120") as running:
        raw = io.BytesIO()
        with tarfile.open(fileobj=raw, mode="w:gz", compresslevel=0) as tar:
            evil = tarfile.TarInfo("/etc/evil")
            evil.size = 3
            tar.addfile(evil, io.BytesIO(b"bad"))
            pad = tarfile.TarInfo("pad.bin")
            pad.size = 400000
            tar.addfile(pad, io.BytesIO(os.urandom(400000)))
        nas.publish("2.0.11", None, tarball=raw.getvalue())
        nas.faults[nas.path_of("2.0.11")] = "stall"
        started = time.monotonic()
        assert running.request("POST", "/update", {"version": "2.0.11"})[0] == 200
        record = running.wait_update(60)
        assert record["state"] == "failed" and "absolute" in record["error"], record
        assert time.monotonic() - started < 10, "the job waited on the stalled NAS"


def test_many_clients_on_fresh_connections_never_fill_the_connection_limit(srv):
    """32 clients, each opening a new connection per request and closing it after the answer
    (HTTP/1.1, no `Connection: close`): the manager must see their closes, whatever the rate.
    (It once kept accepting the reconnecting clients in one loop, never saw the closes, and
    answered 503 'too many connections' to all of them within a second.)"""
    import socket
    request = b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    statuses, stop = [], time.monotonic() + 2

    def client():
        while time.monotonic() < stop:
            with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as sock:
                sock.sendall(request)
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                statuses.append(data[9:12])

    threads = [threading.Thread(target=client) for _ in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(statuses) > 200 and set(statuses) == {b"200"}, \
        f"{len(statuses)} answers: {sorted(set(statuses))}, {statuses.count(b'503')} of them 503"
    deadline = time.monotonic() + 5
    while srv.server.connections and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not srv.server.connections, f"{len(srv.server.connections)} connections left open"


def test_head_answers_like_get_without_a_body(srv):
    code, body, response = srv.request("HEAD", "/status")
    assert code == 200 and body is None and int(response.get("Content-Length")) > 50
    code, body, response = srv.request("HEAD", "/nope")
    assert code == 404 and body is None
    code, body, response = srv.request("PUT", "/version")
    assert code == 405 and response.get("Allow") == "GET, HEAD"
    code, body, response = srv.request("PUT", "/update")
    assert response.get("Allow") == "GET, HEAD, POST"


# --- the update job, with the stand-in for systemd -------------------------------------------

@pytest.fixture
def fleet_host(tmp_path):
    """A hand-made install at 2.0.10 and a NAS with 2.0.11 and 2.0.12."""
    nas = Nas(str(tmp_path / "nas")).start()
    for version in ("2.0.10", "2.0.11", "2.0.12"):
        nas.publish(version, release_files(version))
    running = Running(tmp_path, nas_url=nas.url_template(), settle="0.2", keep_backups="3")
    yield running, nas
    running.close()
    nas.stop()


def update(running, body=None, path="/update"):
    code, answer, _ = running.request("POST", path, body)
    assert code == 200, answer
    return running.wait_update(30)


def installed(running):
    return running.request("GET", "/version")[1]["version"]


def test_a_release_that_fails_the_health_gate_is_rolled_back(fleet_host):
    running, _ = fleet_host
    assert update(running, {"version": "2.0.11"})["state"] == "succeeded"
    running.systemd.unhealthy = {"2.0.12"}
    record = update(running, {"version": "2.0.12"})
    assert record["state"] == "rolled_back" and "ai-hub.service is inactive" in record["error"]
    assert installed(running) == "2.0.11" and running.systemd.active
    phases = [entry["state"] for entry in record["log"]]
    assert phases.index("downloading") < phases.index("verifying") < phases.index("swapping") \
        < phases.index("restarting") < phases.index("checking"), phases
    assert running.systemd.calls == ["restart", "restart", "restart"]  # 2.0.11, 2.0.12, back
    releases = sorted(os.listdir(os.path.join(running.updater.settings.state_dir, "releases")))
    assert [r.split("-", 1)[1] for r in releases] == ["2.0.10", "2.0.11"]  # the bad one is gone


def test_a_health_url_that_does_not_answer_2xx_rolls_back(tmp_path, fleet_host):
    """The new release's health URL answers 503 (for the whole of --settle + 5 s); the old one's
    answers 200 again, so the rollback's own check passes."""
    import http.server
    seen = []

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            version = installed(running)
            seen.append(version)
            self.send_response(503 if version == "2.0.11" else 200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    health = http.server.HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=health.serve_forever, daemon=True).start()
    _, nas = fleet_host
    (tmp_path / "h").mkdir()
    try:
        with Running(tmp_path / "h", nas_url=nas.url_template(), settle="0",
                     health_url=f"http://127.0.0.1:{health.server_address[1]}/health") as running:
            record = update(running, {"version": "2.0.11"})
            assert record["state"] == "rolled_back" and "HTTP 503" in record["error"], record
            assert "not healthy either" not in record["error"], record
            assert installed(running) == "2.0.10"
            assert seen.count("2.0.11") >= 5 and seen[-1] == "2.0.10", seen
    finally:
        health.shutdown()


def test_rollback_goes_back_one_release_at_a_time_to_the_hand_made_install(fleet_host):
    running, _ = fleet_host
    for version in ("2.0.11", "2.0.12"):
        assert update(running, {"version": version})["state"] == "succeeded"
    record = update(running, path="/rollback")
    assert record["state"] == "succeeded" and record["action"] == "rollback"
    assert installed(running) == "2.0.11"
    assert update(running, path="/rollback")["state"] == "succeeded"
    assert installed(running) == "2.0.10"  # the copy of the install made before the manager
    code, body, _ = running.request("POST", "/rollback")
    assert code == 409 and "no previous release" in body["error"]


# What recovery must do after the manager died in each phase of an update to 2.0.12 (from
# 2.0.11). Written out here, not taken from the code's own table.
AFTER_A_CRASH_IN = {"downloading": "failed", "verifying": "failed", "swapping": "failed",
                    "restarting": "rolled_back", "checking": "rolled_back"}


def test_every_working_phase_has_a_recovery_outcome():
    assert set(AFTER_A_CRASH_IN) == set(bam.WORKING_STATES)


@pytest.mark.parametrize("phase", sorted(AFTER_A_CRASH_IN))
def test_recovery_after_a_crash_in_each_phase(fleet_host, phase):
    """Lay the disk and the record as a manager killed in `phase` leaves them, start a new
    manager on them, and check the outcome."""
    running, _ = fleet_host
    assert update(running, {"version": "2.0.11"})["state"] == "succeeded"
    settings, releases = running.updater.settings, running.updater.releases
    running.close()
    before = releases.current_id()
    staging = releases.new_staging("release")
    os.makedirs(os.path.join(staging, "tree", "dist"))  # a half-unpacked download
    added = None
    if phase in ("swapping", "restarting", "checking"):  # the new release was added ...
        tree = os.path.join(staging, "tree")
        shutil.copytree(releases.path(before), tree, symlinks=True, dirs_exist_ok=True)
        with open(os.path.join(tree, "package.json"), "w") as f:
            json.dump({"name": "@proxmox-ai-control/hub", "version": "2.0.12"}, f)
        added = releases.add(tree, "2.0.12")
        if phase != "swapping":  # ... and switched in by restarting's first act
            releases.switch(added)
    record = {"action": "update", "state": phase, "version": "2.0.12", "from_version": "2.0.11",
              "fallback": before, "target": added, "error": None, "log": []}
    with open(os.path.join(settings.state_dir, "update.json"), "w") as f:
        json.dump(record, f)

    restarted = Running.__new__(Running)  # the next start, on the same folders
    restarted.systemd = FakeSystemd(install_dir=settings.install_dir)
    updater = bam.Updater(settings, restarted.systemd, bam.Releases(settings.install_dir,
                                                                    settings.state_dir))
    updater.recover()
    after = updater.view()
    assert after["state"] == AFTER_A_CRASH_IN[phase], after
    assert f"the manager stopped during '{phase}'" in after["error"]
    assert updater.releases.current_id() == before
    assert os.listdir(os.path.join(settings.state_dir, "staging")) == []
    assert [r for r in updater.releases.ids() if r > before] == []  # the new one is gone
    with open(os.path.join(settings.install_dir, "package.json")) as f:
        assert json.load(f)["version"] == "2.0.11"
    expected_calls = ["restart"] if AFTER_A_CRASH_IN[phase] == "rolled_back" else []
    assert restarted.systemd.calls == expected_calls


def test_a_start_deletes_releases_a_crash_left_beyond_keep_backups(tmp_path):
    """A manager killed after `succeeded` was saved but before its clean-up leaves one release
    too many; the next start deletes it."""
    with Nas(str(tmp_path / "nas")) as nas, \
            Running(tmp_path, nas_url=nas.url_template(), keep_backups="1") as running:
        for version in ("2.0.11", "2.0.12"):
            nas.publish(version, release_files(version))
            assert update(running, {"version": version})["state"] == "succeeded"
        releases = running.updater.releases
        kept = releases.ids()
        assert [r.split("-", 1)[1] for r in kept] == ["2.0.11", "2.0.12"]
    shutil.copytree(releases.path(kept[0]), releases.path("000000-2.0.9"), symlinks=True)
    updater = bam.Updater(running.updater.settings, FakeSystemd(), bam.Releases(
        releases.install_dir, releases.state_dir))
    updater.recover()
    assert updater.releases.ids() == kept


def test_a_refused_request_still_being_sent_gets_its_answer_and_a_clean_close(tmp_path):
    """A POST refused at its head (Transfer-Encoding) while the client is still sending its
    megabyte of body: the manager answers 400, stops writing, drops what still comes, then
    closes. Closing at once with the body unread would reset the connection, and a reset can
    destroy the answer on its way (here the client saw the 400, then a reset)."""
    import socket
    running = Running(tmp_path)
    outcomes = []
    try:
        for _ in range(5):
            sock = socket.create_connection(("127.0.0.1", running.port), timeout=10)

            def send():
                try:
                    sock.sendall(b"POST /update HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: "
                                 b"chunked\r\n\r\n100000\r\n" + b"x" * (1 << 20))
                except OSError:
                    pass

            sender = threading.Thread(target=send)
            sender.start()
            got = b""
            try:
                while True:
                    data = sock.recv(65536)
                    if not data:
                        break
                    got += data
                outcomes.append((got.split(b"\r\n")[0], "end"))
            except ConnectionResetError:
                outcomes.append((got.split(b"\r\n")[0], "reset"))
            sender.join()
            sock.close()
    finally:
        running.close()
    assert outcomes == [(b"HTTP/1.1 400 Bad Request", "end")] * 5, outcomes
    assert running.systemd.calls == []
