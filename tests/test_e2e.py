"""End to end: the real manager, installed from systemd/ai-hub-manager.service into a real systemd
(with journald) booted in a namespace, controlling a real service, updating it from real tarballs
served by a real HTTP NAS on loopback. Run once per interpreter: Debian's /usr/bin/python3
(3.11.2, tarfile without extraction filters), 3.9 and the newest from pyenv.

The tests of one interpreter share one host (booting one per test would triple the time), but
none depends on another having run: a test that needs a starting point makes it, with fresh()
(a hand-made install at 2.0.10 and no manager state) and the updates it needs, so any one of
them passes alone (`-k rollback`)."""

import json
import os
import shutil

import pytest

from support import Host, free_port, sandboxed

from conftest import INTERPRETERS, interpreter


@pytest.fixture(scope="module", params=sorted(INTERPRETERS))
def host(request, sandbox, nas, work_dir, node_hub):
    """The real Node hub at 2.0.10, installed by hand (GNU tar) next to its config.json."""
    python = interpreter(request.param)
    base = os.path.join(work_dir, f"host-{request.param}")
    os.makedirs(base)
    h = Host(sandbox, base, nas, python=python, settle=1, env={"BACKEND_AI_KEEP_BACKUPS": "2"},
             node=node_hub)
    for version in ("2.0.10", "2.0.11", "2.0.12", "2.0.13", "2.0.14", "2.0.15"):
        if not os.path.exists(nas.tarball(version)):
            h.publish(version, wrap="package" if version == "2.0.12" else None,
                      crash=version == "2.0.13")
    h.interpreter = request.param
    h.install_base("2.0.10")
    h.start()
    yield h
    h.stop()
    shutil.rmtree(base, ignore_errors=True)


def fresh(host):
    """Back to a hand-made install at 2.0.10 (GNU tar), no manager state, both units running."""
    host.stop()
    shutil.rmtree(host.install_dir)
    shutil.rmtree(host.state_dir, ignore_errors=True)
    host.install_base("2.0.10")
    host.start()


def update_to(host, version, path="/update"):
    status, body = host.api("POST", path, {"version": version} if version else None)
    assert status == 200, body
    return host.wait_update()


def installed_version(host):
    with open(os.path.join(host.install_dir, "package.json")) as f:
        return json.load(f)["version"]


def test_manager_runs_under_the_interpreter_given(host):
    pid = host.sandbox.systemctl("show", host.MANAGER_UNIT, "-p", "MainPID").stdout.split("=")[1]
    exe = host.sandbox.run(["readlink", f"/proc/{pid.strip()}/exe"]).stdout.strip()
    assert os.path.realpath(exe) == os.path.realpath(INTERPRETERS[host.interpreter])


def test_status_reports_the_real_unit(host):
    fresh(host)
    status, body = host.api("GET", "/status")
    assert status == 200 and body["running"] is True
    assert body["active_state"] == "active" and body["sub_state"] == "running"
    assert body["main_pid"] == host.main_pid() > 1
    assert body["since"].endswith("Z") and body["restarts"] == 0
    assert body["version"] == "2.0.10" and body["service"] == "ai-hub.service"
    assert body["update"]["state"] == "idle"
    host.assert_installed("2.0.10")  # the hand-made install is GNU tar's extraction


def test_stop_start_restart_change_the_real_service(host):
    status, body = host.api("POST", "/stop")
    assert (status, body["success"], body["changed"]) == (200, True, True)
    assert host.is_active() == "inactive"
    assert host.api("GET", "/status")[1]["running"] is False
    status, body = host.api("POST", "/stop")
    assert status == 200 and body["changed"] is False  # idempotent, and says so
    status, body = host.api("POST", "/start")
    assert status == 200 and body["changed"] is True and host.is_active() == "active"
    before = host.main_pid()
    status, body = host.api("POST", "/restart")
    assert status == 200 and body["success"] is True
    assert host.is_active() == "active" and host.main_pid() != before
    assert host.service_info()["version"] == installed_version(host)


def test_logs_hold_the_services_own_output(host):
    status, body = host.api("GET", "/logs?lines=20")
    assert status == 200 and body["service"] == "ai-hub.service" and body["lines"] == 20
    assert f"{installed_version(host)} listening on 127.0.0.1:{host.service_port}" in body["logs"]
    assert len(body["logs"].splitlines()) <= 20
    status, body = host.api("GET", "/logs?lines=1")
    assert len(body["logs"].splitlines()) == 1


def test_version_reads_package_json(host):
    assert host.api("GET", "/version") == (200, {"version": installed_version(host),
                                                 "name": "@proxmox-ai-control/hub"})


def test_errors_are_json_and_change_nothing(host):
    pid = host.main_pid()
    assert host.api("GET", "/nope")[0] == 404
    status, body = host.api("GET", "/restart")
    assert status == 405 and body["success"] is False
    assert host.api("POST", "/update", {"version": "../../etc/passwd"})[0] == 400
    assert host.api("POST", "/update", b"{nope")[0] == 400
    assert host.api("GET", "/logs?lines=x")[0] == 400
    assert host.api("POST", "/update", b"{" + b" " * 8000 + b"}")[0] == 413
    assert host.main_pid() == pid and host.api("GET", "/update")[1]["state"] == "idle"


def test_update_installs_the_new_code_and_keeps_config(host):
    fresh(host)
    view_before = host.view()
    status, body = host.api("POST", "/update", {"version": "2.0.11"})
    assert status == 200
    assert body["success"] is True and body["message"] == "Hub update to version 2.0.11 started"
    record = host.wait_update()
    assert record["state"] == "succeeded", record
    assert record["error"] is None and record["version"] == "2.0.11"
    assert record["from_version"] == "2.0.10" and record["bytes"] == record["total"] > 0
    steps = [entry["state"] for entry in record["log"]]
    for state in ("downloading", "verifying", "swapping", "restarting", "checking",
                  "succeeded"):
        assert state in steps, steps
    host.assert_installed("2.0.11")
    info = host.service_info()  # the real Node hub, loading express from node_modules/
    assert info["version"] == "2.0.11" and info["code"] == "hub code of 2.0.11"
    assert info["greeting"] == "hello from config.json"  # the install dir's own file was kept
    assert host.api("GET", "/version")[1]["version"] == "2.0.11"
    status = host.api("GET", "/status")[1]
    assert status["version"] == "2.0.11" and status["update"]["state"] == "succeeded"
    tsc = os.path.join(host.install_dir, "node_modules", ".bin", "tsc")
    assert os.path.islink(tsc) and os.readlink(tsc) == "../typescript/bin/tsc"
    assert open(tsc).read().startswith("#!/usr/bin/env node")
    assert host.view() != view_before
    # the release the update replaced is kept for rollback
    releases = os.listdir(os.path.join(host.state_dir, "releases"))
    assert any(r.endswith("-2.0.10") for r in releases) and any(r.endswith("-2.0.11")
                                                                 for r in releases)


def test_rollback_to_the_copy_of_the_hand_made_install_and_forward_again(host):
    fresh(host)
    assert update_to(host, "2.0.11")["state"] == "succeeded"
    status, body = host.api("POST", "/rollback")
    assert status == 200 and "rollback to version 2.0.10" in body["message"], body
    record = host.wait_update()
    assert record["state"] == "succeeded", record
    host.assert_installed("2.0.10")
    info = host.service_info()
    assert info["version"] == "2.0.10" and info["greeting"] == "hello from config.json"
    assert host.api("POST", "/update", {"version": "2.0.11"})[0] == 200
    assert host.wait_update()["state"] == "succeeded"
    host.assert_installed("2.0.11")
    assert host.service_info()["version"] == "2.0.11"


def test_update_of_a_release_wrapped_in_one_folder(host):
    assert host.api("POST", "/update", {"version": "2.0.12"})[0] == 200
    record = host.wait_update()
    assert record["state"] == "succeeded", record
    host.assert_installed("2.0.12")
    assert host.service_info()["version"] == "2.0.12"
    assert not os.path.exists(os.path.join(host.install_dir, "package"))


def test_a_release_that_crashes_at_start_is_rolled_back(host):
    before = installed_version(host)
    assert host.api("POST", "/update", {"version": "2.0.13"})[0] == 200
    record = host.wait_update()
    assert record["state"] == "rolled_back", record
    assert "this release is broken" in record["error"] or "exit" in record["error"], record
    assert host.is_active() == "active", (record, host.sandbox.run(
        ["journalctl", "-u", host.SERVICE, "-n", "30", "--no-pager"]).stdout)
    assert host.service_info()["version"] == before
    assert host.api("GET", "/version")[1]["version"] == before
    host.assert_installed(before)


def test_update_to_a_missing_version_fails_and_changes_nothing(host):
    view = host.view()
    pid = host.main_pid()
    assert host.api("POST", "/update", {"version": "9.9.9"})[0] == 200
    record = host.wait_update()
    assert record["state"] == "failed" and "404" in record["error"], record
    assert host.view() == view and host.main_pid() == pid


def test_rollback_goes_to_the_previous_release(host):
    for version in ("2.0.11", "2.0.12"):
        assert update_to(host, version)["state"] == "succeeded"
    status, body = host.api("POST", "/rollback")
    assert status == 200 and "rollback to version 2.0.11" in body["message"]
    record = host.wait_update()
    assert record["state"] == "succeeded", record
    host.assert_installed("2.0.11")
    assert host.service_info()["version"] == "2.0.11"


def test_the_update_record_survives_a_manager_restart(host):
    assert update_to(host, "2.0.11")["state"] == "succeeded"
    assert update_to(host, None, "/rollback")["state"] == "succeeded"
    before = host.api("GET", "/update")[1]
    assert host.sandbox.systemctl("restart", host.MANAGER_UNIT).returncode == 0
    host.wait_manager()
    after = host.api("GET", "/update")[1]
    assert after["state"] == before["state"] == "succeeded"
    assert after["started_at"] == before["started_at"] and after["action"] == "rollback"
    assert after["log"] == before["log"] and after["version"] == installed_version(host)
    assert host.service_info()["version"] == installed_version(host)


def test_one_update_at_a_time_and_retention_of_exactly_n_backups(host):
    assert host.api("POST", "/update", {"version": "2.0.12"})[0] == 200
    status, body = host.api("POST", "/update", {"version": "2.0.14"})
    assert status == 409 and "already running" in body["error"]
    assert host.api("POST", "/restart")[0] == 409
    assert host.wait_update()["state"] == "succeeded"
    for version in ("2.0.14", "2.0.15"):
        assert host.api("POST", "/update", {"version": version})[0] == 200
        assert host.wait_update()["state"] == "succeeded"
    releases = sorted(os.listdir(os.path.join(host.state_dir, "releases")))
    assert [r.split("-", 1)[1] for r in releases] == ["2.0.12", "2.0.14", "2.0.15"]  # current + 2
    host.assert_installed("2.0.15")
    assert host.service_info()["version"] == "2.0.15"


def test_manager_journal_has_priorities(host):
    assert update_to(host, "2.0.13")["state"] == "rolled_back"  # an error, then a warning
    out = host.sandbox.run(["journalctl", "-u", host.MANAGER_UNIT, "-o", "json", "--no-pager"])
    entries = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
    priorities = {e.get("PRIORITY") for e in entries if "update" in str(e.get("MESSAGE"))}
    assert "6" in priorities and "3" in priorities  # info for steps, error for the bad release


def test_systemctl_failures_come_back_with_systemds_own_words(host):
    """A second manager, started from the command line with flags, for units that fail: a
    missing unit (500 with systemd's message) and one whose start outlasts --command-timeout
    (504)."""
    host.sandbox.add_unit("ai-slow.service", sandboxed("[Unit]\n[Service]\nType=oneshot\n"
                                                     "ExecStart=/bin/sleep 20\n"))
    for service, status, words in (("ai-missing.service", 500, "not found"),
                                   ("ai-slow.service", 504, "timed out")):
        port = free_port()
        probe_unit = f"bam-probe-{port}"
        started = host.sandbox.run([
            "systemd-run", f"--unit={probe_unit}", "--collect", "--quiet",
            "--property=DefaultDependencies=no",
            INTERPRETERS[host.interpreter], host.manager,
            "serve", "--role", "agent", "--bind", "127.0.0.1", "--port", str(port),
            "--service", service, "--install-dir", host.install_dir,
            "--state-dir", os.path.join(host.base, f"state-{service}"),
            "--command-timeout", "1", "--nas-url", "http://127.0.0.1:9/{version}"])
        assert started.returncode == 0, started.stderr
        try:
            probe = Host(host.sandbox, host.base, host.nas)
            probe.port = port
            probe.wait_manager()
            code, body = probe.api("POST", "/start")
            assert code == status and words in body["error"], body
            assert body["success"] is False and service in body["error"]
            code, body = probe.api("GET", "/status")
            assert code == 200 and body["running"] is False
        finally:
            host.sandbox.systemctl("stop", probe_unit)
    host.sandbox.systemctl("stop", "ai-slow.service")


def test_restarts_past_systemds_start_rate_limit(host):
    # systemd's default allows 5 starts in 10 s; an operator's restarts must all go through.
    pids = [host.main_pid()]
    for _ in range(7):
        status, body = host.api("POST", "/restart")
        assert status == 200 and body["success"] is True, body
        pids.append(host.main_pid())
    assert len(set(pids)) == len(pids) and host.is_active() == "active"
    result = host.sandbox.systemctl("show", host.SERVICE, "-p", "Result", "--value")
    assert result.stdout.strip() == "success"
