"""End to end: the managed service runs as its own user, as Node services are hardened to, not as
root. The real Node hub runs under `User=` with an account this test creates, and under
`DynamicUser=yes`; every release it can be switched to (the first update's copy of the hand-made
install included) must be enterable and readable by it, owned by root and not writable by it.

Each time the service runs, it answers with the right version and the text of a file it read
from dist/, as a uid other than 0. Runs the manager under Debian's /usr/bin/python3."""

import os
import pwd
import shutil
import stat
import subprocess

import pytest

from support import Host

PYTHON = "/usr/bin/python3"
ACCOUNT = "bam-test-hub"
MODES = {"user": [f"User={ACCOUNT}"], "dynamic": ["DynamicUser=yes"]}
LISTINGS = []  # `ls -l STATE/releases` after each mode's updates, printed at the end


@pytest.fixture(scope="module")
def account():
    """A system account for User=, made for this test and removed after it (the sandbox shares
    the machine's /etc/passwd)."""
    subprocess.run(["userdel", ACCOUNT], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                    ACCOUNT], check=True)
    yield pwd.getpwnam(ACCOUNT).pw_uid
    subprocess.run(["userdel", ACCOUNT], check=True)
    print("\n" + "\n".join(LISTINGS))


@pytest.fixture(scope="module", params=sorted(MODES))
def host(request, sandbox, nas, work_dir, node_hub, account):
    base = os.path.join(work_dir, f"users-{request.param}")
    os.makedirs(base)
    h = Host(sandbox, base, nas, python=PYTHON, settle=1, node=node_hub,
             service_lines=MODES[request.param], env={"BACKEND_AI_KEEP_BACKUPS": "3"})
    h.mode, h.account = request.param, account
    for version in ("2.0.10", "2.0.11", "2.0.12", "2.0.13"):
        if not os.path.exists(nas.tarball(version)):
            h.publish(version, crash=version == "2.0.13")
    h.install_base("2.0.10")
    h.start()
    yield h
    h.stop()
    shutil.rmtree(base, ignore_errors=True)


def expect_running(host, version):
    """The hub runs `version`, as its own user, reading its files through the install dir."""
    info = host.service_info()
    assert info["version"] == version and info["code"] == f"hub code of {version}", info
    assert info["greeting"] == "hello from config.json"
    uid = host.service_uid()
    assert uid != 0
    if host.mode == "user":
        assert uid == host.account
    host.assert_installed(version)


def update(host, path, body=None, expect="succeeded"):
    status, answer = host.api("POST", path, body)
    assert status == 200, answer
    record = host.wait_update()
    assert record["state"] == expect, record
    return record


def assert_releases_readable(host):
    """Every folder from the state dir to each kept release, and what `current` points at, is
    0755 and root's; the files in it are root's and not writable by others."""
    releases = os.path.join(host.state_dir, "releases")
    chain = [host.state_dir, releases, os.path.realpath(os.path.join(host.state_dir, "current"))]
    for release in os.listdir(releases):
        chain.append(os.path.join(releases, release))
    for path in chain:
        st = os.stat(path)
        assert stat.S_IMODE(st.st_mode) == 0o755 and st.st_uid == 0, (path, oct(st.st_mode))
    for release in os.listdir(releases):
        for folder, dirs, files in os.walk(os.path.join(releases, release)):
            for name in dirs + files:
                st = os.lstat(os.path.join(folder, name))
                if not stat.S_ISLNK(st.st_mode):
                    assert st.st_uid == 0 and not st.st_mode & 0o022, (folder, name)
                    assert stat.S_IMODE(st.st_mode) in (0o755, 0o644), (folder, name)
    listing = subprocess.run(["ls", "-l", "--time-style=+", releases], stdout=subprocess.PIPE,
                             universal_newlines=True).stdout
    LISTINGS.append(f"{host.mode}: ls -l {releases}\n{listing}")


def test_updates_and_rollbacks_of_a_service_running_as_its_own_user(host):
    expect_running(host, "2.0.10")  # the hand-made install, before the manager touched it
    # the first update: the hand-made install is copied into a kept release (the migration)
    update(host, "/update", {"version": "2.0.11"})
    expect_running(host, "2.0.11")
    update(host, "/update", {"version": "2.0.12"})  # a normal update
    expect_running(host, "2.0.12")
    # a crashing release is rolled back automatically, and the user's service runs again
    record = update(host, "/update", {"version": "2.0.13"}, expect="rolled_back")
    assert "ai-hub.service" in record["error"], record
    expect_running(host, "2.0.12")
    assert_releases_readable(host)
    # /rollback twice: to 2.0.11, then to the copy of the pre-manager install
    update(host, "/rollback")
    expect_running(host, "2.0.11")
    update(host, "/rollback")
    expect_running(host, "2.0.10")
    assert_releases_readable(host)


@pytest.mark.parametrize("failpoint", ["link-exchanged:1", "switched"])
def test_kill_during_the_migration_then_recovery(host, failpoint):
    """kill -9 of the manager while the first update migrates a hand-made install: the service
    that recovery restarts runs, as its own user, from the copy of that install."""
    host.stop()
    shutil.rmtree(host.install_dir)
    shutil.rmtree(host.state_dir)
    host.install_base("2.0.10")
    host.start()
    expect_running(host, "2.0.10")
    host.restart_manager(BACKEND_AI_FAILPOINT=failpoint)
    pid = host.manager_pid()
    assert host.api("POST", "/update", {"version": "2.0.11"})[0] == 200
    assert host.wait_manager_killed(pid), host.api("GET", "/update")[1]
    host.restart_manager(BACKEND_AI_FAILPOINT=None)
    record = host.api("GET", "/update")[1]
    assert record["state"] in ("failed", "rolled_back"), record
    assert "manager stopped" in record["error"], record
    assert host.is_active() == "active"
    expect_running(host, "2.0.10")
    assert_releases_readable(host)
    update(host, "/update", {"version": "2.0.11"})  # and the next update works
    expect_running(host, "2.0.11")
