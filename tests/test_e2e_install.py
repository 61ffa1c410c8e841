"""End to end: `install` and `uninstall` as an operator runs them on a host, as root, with the
sandbox's systemd as the host's: the files written, the hardening probe (passing here, and made
to fail with a real 226/NAMESPACE through BACKEND_AI_INSTALL_PROBE_EXTRA), the unit enabled and
answering, a second run changing nothing, --dry-run writing nothing, uninstall leaving the state
dir. The exposure scores of `systemd-analyze security` with and without the drop-in are printed.

The sandbox shares the host's /etc and /usr: inside its mount namespace (only there) this module
mounts empty tmpfs folders on /etc/systemd/system, /etc/default and /usr/local/lib, so that
install writes where it would on a host without touching this machine's own. The unit as
installed has systemd's default dependencies, which inside the sandbox would pull in
sysinit.target and its units acting on the machine's files: a drop-in in the sandbox's own unit
folder gives it DefaultDependencies=no (as every unit of the sandbox has).
"""

import hashlib
import os
import random
import re
import shutil

import pytest

from support import MANAGER, REPO, Host, sandboxed

PYTHON = "/usr/bin/python3"
UNIT = "ai-hub-manager.service"
UNIT_PATH = f"/etc/systemd/system/{UNIT}"
DROPIN = f"/etc/systemd/system/{UNIT}.d/hardening.conf"
DEFAULTS = "/etc/default/ai-hub-manager"
LIB = "/usr/local/lib/backend-ai-manager/backend_ai_manager.py"
ISOLATED = ("/etc/systemd/system", "/etc/default", "/usr/local/lib")
NAMESPACE_FAILURE = "-p ReadOnlyPaths=/nonexistent"
SCORES = {}


@pytest.fixture(scope="module")
def host(sandbox, nas, work_dir):
    base = os.path.join(work_dir, "install")
    os.makedirs(base)
    host = Host(sandbox, base, nas, python=PYTHON, settle=0.5)
    host.install_base("2.0.10")
    host.install_manager()  # the file the operator copied to the host
    mounted = []
    try:
        for path in ISOLATED:
            result = sandbox.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", path])
            assert result.returncode == 0, result.stderr
            mounted.append(path)
        # The sandbox's own unit folder comes first in systemd's search path: a manager unit
        # an earlier test wrote there would hide the one install writes.
        for stale in (UNIT, f"{UNIT}.d/hardening.conf"):
            if os.path.exists(os.path.join(sandbox.units_dir, stale)):
                os.unlink(os.path.join(sandbox.units_dir, stale))
        sandbox.add_unit(f"{UNIT}.d/sandbox.conf", "[Unit]\nDefaultDependencies=no\n")
        sandbox.add_unit(host.SERVICE, sandboxed(host.service_unit()))
        assert sandbox.systemctl("start", host.SERVICE).returncode == 0
        yield host
    finally:
        sandbox.run([PYTHON, host.manager, "uninstall", "--role", "hub"])
        sandbox.systemctl("stop", host.SERVICE)
        for path in reversed(mounted):
            sandbox.run(["umount", "-l", path])
        os.unlink(os.path.join(sandbox.units_dir, f"{UNIT}.d", "sandbox.conf"))
        sandbox.systemctl("daemon-reload")
        shutil.rmtree(base, ignore_errors=True)


def options(host, **more):
    values = {"--install-dir": host.install_dir, "--state-dir": host.state_dir,
              "--port": str(host.port), "--nas-url": host.nas.url_template("hub"),
              "--settle": "0.5", "--service": host.SERVICE}
    values.update(more)
    return [word for pair in values.items() for word in pair]


def run_install(host, *args, extra=None):
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    if extra:
        env["BACKEND_AI_INSTALL_PROBE_EXTRA"] = extra
    return host.sandbox.run([PYTHON, host.manager, *args], env=env, timeout=120)


def read(host, path):
    """A file as the sandbox (the host being installed) sees it; None if missing."""
    result = host.sandbox.run(["cat", path])
    return result.stdout if result.returncode == 0 else None


def manager_status(host):
    status, answer = host.api("GET", "/status")
    assert status == 200, answer
    return answer


def unit_pid(host):
    return int(host.sandbox.systemctl("show", UNIT, "-p", "MainPID").stdout.split("=")[1])


def exposure(host):
    out = host.sandbox.run(["systemd-analyze", "security", UNIT, "--no-pager"]).stdout
    return float(re.search(r"Overall exposure level for \S+: ([0-9.]+)", out).group(1))


def repo_file(name):
    with open(os.path.join(REPO, "systemd", name)) as f:
        return f.read()


def test_install_writes_the_unit_the_drop_in_and_the_options_and_starts_it(host):
    run = run_install(host, "install", "--role", "hub", *options(host))
    print("\n" + run.stdout)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "hardening probe: passed" in run.stdout
    for path in (LIB, UNIT_PATH, DROPIN, DEFAULTS):
        assert f"write {path}\n" in run.stdout
    assert read(host, UNIT_PATH) == repo_file(UNIT)  # the unit systemd/ ships, byte for byte
    assert read(host, DROPIN) == repo_file(f"{UNIT}.d/hardening.conf")
    with open(MANAGER, "rb") as f:
        assert hashlib.sha256(read(host, LIB).encode()).hexdigest() == \
            hashlib.sha256(f.read()).hexdigest()
    defaults = read(host, DEFAULTS).splitlines()
    assert f"BACKEND_AI_PORT={host.port}" in defaults
    assert f"BACKEND_AI_INSTALL_DIR={host.install_dir}" in defaults
    assert not [line for line in defaults if line.startswith(("BACKEND_AI_ROLE",
                                                              "BACKEND_AI_BIND"))]
    assert host.sandbox.systemctl("is-enabled", UNIT).stdout.strip() == "enabled"
    assert host.sandbox.systemctl("is-active", UNIT).stdout.strip() == "active"
    cmdline = host.sandbox.run(["cat", f"/proc/{unit_pid(host)}/cmdline"]).stdout
    assert LIB in cmdline.split("\0")  # the installed copy runs, not the operator's file
    answer = manager_status(host)
    assert answer["manager"]["hardening"] == "full" and answer["version"] == "2.0.10"
    assert "manager: " in run.stdout and "hardening: full" in run.stdout
    SCORES["with the drop-in"] = exposure(host)


def test_a_second_install_changes_nothing(host):
    pid = unit_pid(host)
    before = {path: read(host, path) for path in (LIB, UNIT_PATH, DROPIN, DEFAULTS)}
    run = run_install(host, "install", "--role", "hub", *options(host))
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"nothing to change: {UNIT} is installed, enabled and running" in run.stdout
    assert "write " not in run.stdout
    assert unit_pid(host) == pid
    assert {path: read(host, path) for path in before} == before


def test_dry_run_prints_and_writes_nothing(host):
    pid = unit_pid(host)
    before = read(host, DEFAULTS)
    run = run_install(host, "install", "--dry-run", "--role", "hub",
                      *options(host, **{"--settle": "2"}))
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"would write {DEFAULTS}\n" in run.stdout and "    BACKEND_AI_SETTLE=2" in run.stdout
    assert "dry run: nothing written" in run.stdout
    assert read(host, DEFAULTS) == before and unit_pid(host) == pid


def test_bad_settings_change_nothing(host):
    pid = unit_pid(host)
    before = read(host, DEFAULTS)
    run = run_install(host, "install", "--role", "hub", *options(host, **{"--port": "99999"}))
    assert run.returncode == 2 and "invalid --port" in run.stderr and run.stdout == ""
    assert read(host, DEFAULTS) == before and unit_pid(host) == pid


def test_a_failed_probe_installs_without_the_drop_in_and_says_how_to_fix_it(host):
    pid = unit_pid(host)
    run = run_install(host, "install", "--role", "hub", *options(host), extra=NAMESPACE_FAILURE)
    print("\n" + run.stdout)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "hardening probe: failed with exit status 226 (226/NAMESPACE):\n" in run.stdout
    assert "Failed to set up mount namespacing" in run.stdout
    assert "\n    pct set <ID> --features nesting=1\n" in run.stdout
    assert "installed without ProtectKernelTunables=yes and ProtectControlGroups=yes" in run.stdout
    assert f"remove {DROPIN}\n" in run.stdout
    assert read(host, DROPIN) is None and read(host, UNIT_PATH) == repo_file(UNIT)
    assert unit_pid(host) != pid  # restarted without it
    answer = manager_status(host)
    assert answer["manager"]["hardening"] == "without the namespace drop-in"
    SCORES["without the drop-in"] = exposure(host)
    print(f"systemd-analyze security {UNIT}: {SCORES}")
    # With the fix (nesting on), install again puts the drop-in back.
    run = run_install(host, "install", "--role", "hub", *options(host))
    assert run.returncode == 0 and f"write {DROPIN}\n" in run.stdout, run.stdout
    assert manager_status(host)["manager"]["hardening"] == "full"


def test_install_does_not_restart_a_manager_in_the_middle_of_an_update(host):
    blob = random.Random(26).randbytes(2 * 1024 * 1024 + 77)
    host.publish("2.0.11", extra={"dist/blob.bin": blob})
    host.nas.faults[host.nas.path_of("2.0.11")] = "throttle:1000000"
    try:
        pid = unit_pid(host)
        before = read(host, DEFAULTS)
        assert host.api("POST", "/update", {"version": "2.0.11"})[0] == 200
        run = run_install(host, "install", "--role", "hub", *options(host, **{"--settle": "1"}))
        assert run.returncode == 1, run.stdout + run.stderr
        assert f"{UNIT} is running a job (update to 2.0.11: downloading)" in run.stderr
        assert "run install again when it is over" in run.stderr
        assert read(host, DEFAULTS) == before and unit_pid(host) == pid
        record = host.wait_update(60)
        assert record["state"] == "succeeded", record
        host.assert_installed("2.0.11")  # the whole tree, byte for byte, against GNU tar
    finally:
        host.nas.faults.pop(host.nas.path_of("2.0.11"), None)


def test_uninstall_leaves_no_unit_and_keeps_the_state_dir(host):
    run = run_install(host, "uninstall", "--role", "hub")
    assert run.returncode == 0, run.stdout + run.stderr
    for path in (UNIT_PATH, DROPIN, DEFAULTS, LIB):
        assert f"removed {path}\n" in run.stdout
        assert read(host, path) is None
    assert f"the state dir {host.state_dir} is left in place" in run.stdout
    assert os.path.isdir(host.state_dir)
    listed = host.sandbox.systemctl("list-unit-files", UNIT, "--no-legend").stdout
    assert listed.strip() == ""
    assert host.sandbox.systemctl("is-active", UNIT).stdout.strip() in ("inactive", "unknown")
    again = run_install(host, "uninstall", "--role", "hub")
    assert again.returncode == 0 and f"nothing to remove: {UNIT} is not installed" in again.stdout
