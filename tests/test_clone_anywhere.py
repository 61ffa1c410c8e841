"""A new user's checkout: `make demo` and `make test` from where people clone, not only from the
developer's checkout: a folder in the home folder (which the manager unit's ProtectHome= hides)
whose path has a space and an apostrophe. One clone covers both: each run of the two commands
takes about a minute.

The clone is the checkout's files as git sees them (tracked, and new files not ignored), copied,
so the test checks the code as it is now. The inner `make test` runs an end-to-end subset: the
whole suite from inside the suite would double its time, and the subset goes through everything
a clone's location can break (the lab, the manager unit's hardening, paths in unit files)."""

import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from support import REPO
from conftest import need_sandbox

E2E_SUBSET = ("tests/test_e2e.py -k 'debian and (status or stop_start or update_installs or wrapped "
              "or crashes_at_start)'")


def new_users_clone(parent):
    listed = subprocess.run(["git", "-C", REPO, "ls-files", "-z", "-co", "--exclude-standard"],
                            stdout=subprocess.PIPE, check=True).stdout.split(b"\0")
    dest = os.path.join(parent, "backend-ai-manager")
    for rel in filter(None, (name.decode() for name in listed)):
        src = os.path.join(REPO, rel)
        if not os.path.lexists(src):
            continue  # deleted in the working tree
        os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
        if os.path.islink(src):
            os.symlink(os.readlink(src), os.path.join(dest, rel))
        else:
            shutil.copy2(src, os.path.join(dest, rel))
    return dest


def make(clone, *args, timeout=400):
    started = time.monotonic()
    result = subprocess.run(["make", "-C", clone, f"PYTHON={sys.executable}", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout,
                            universal_newlines=True)
    return result, time.monotonic() - started


@pytest.fixture
def clone():
    need_sandbox()
    if shutil.which("git") is None or not os.path.isdir(os.path.join(REPO, ".git")):
        pytest.skip("not a git checkout")
    parent = os.path.join(os.path.expanduser("~"), f"bam new user's {os.getpid()}")
    os.makedirs(parent)
    try:
        yield new_users_clone(parent)
    finally:
        shutil.rmtree(parent, ignore_errors=True)


def test_demo_and_tests_pass_from_a_new_users_clone(clone):
    demo, seconds = make(clone, "demo")
    assert demo.returncode == 0, f"make demo failed in {clone!r}:\n{demo.stdout[-3000:]}"
    assert "Done: every endpoint answered" in demo.stdout
    print(f"make demo in {clone!r}: {seconds:.1f} s")
    tests, seconds = make(clone, "test", f"TESTS={E2E_SUBSET}")
    assert tests.returncode == 0, f"make test failed in {clone!r}:\n{tests.stdout[-3000:]}"
    last = [line for line in tests.stdout.splitlines() if re.search(r"\d+ passed", line)][-1]
    assert "failed" not in last and "skipped" not in last and "error" not in last, last
    print(f"make test ({E2E_SUBSET}) in {clone!r}: {seconds:.1f} s, {last}")
    # Nothing of the lab is left behind, in the clone or under the lab root.
    assert not os.path.exists(os.path.join(clone, ".sandbox"))


def test_a_state_dir_under_home_stops_the_manager_naming_the_hardening(sandbox, nas, work_dir):
    """The shipped unit makes /root read-only for the manager; the start-up error names the
    folder and the directive, so an operator knows to add ReadWritePaths=."""
    from support import Host
    home = os.path.join(os.path.expanduser("~"), f"bam-state-{os.getpid()}")
    base = os.path.join(work_dir, "read-only-state")
    os.makedirs(base)
    host = Host(sandbox, base, nas, env={"BACKEND_AI_STATE_DIR": os.path.join(home, "state")})
    host.install_base("2.0.10")
    os.makedirs(home)
    try:
        host.write_units()
        cursor = sandbox.run(["journalctl", "-n", "0", "--show-cursor", "--no-pager"]).stdout
        cursor = cursor.strip().rsplit("cursor: ", 1)[-1]
        assert sandbox.systemctl("start", host.MANAGER_UNIT).returncode != 0
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            log = sandbox.run(["journalctl", "-u", host.MANAGER_UNIT, f"--after-cursor={cursor}",
                               "--no-pager", "-o", "cat"]).stdout
            if "cannot prepare" in log:
                break
            time.sleep(0.1)
        line = [ln for ln in log.splitlines() if "cannot prepare" in ln][0]
        assert home in line and "Read-only file system" in line, line
        assert "ProtectHome=read-only" in line and "ReadWritePaths=" in line, line
        assert not os.path.exists(os.path.join(home, "state"))
    finally:
        sandbox.systemctl("stop", host.MANAGER_UNIT)
        sandbox.systemctl("reset-failed", host.MANAGER_UNIT)
        shutil.rmtree(home, ignore_errors=True)
