"""`install`'s pure parts, fast and without root: the units it writes are the ones systemd/ ships,
the probe carries the unit's own mount hardening, the defaults file holds the options given. The
real thing, in the systemd sandbox: test_e2e_install.py."""

import os
import subprocess
import sys

import pytest

import backend_ai_manager as bam
from support import MANAGER, REPO


@pytest.mark.parametrize("role", ["hub", "agent"])
def test_the_units_install_writes_are_the_ones_shipped(role):
    for path, text in bam.unit_files(role).items():
        shipped = os.path.join(REPO, "systemd", os.path.relpath(path, bam.UNIT_DIR))
        with open(shipped) as f:
            assert f.read() == text, f"{shipped} differs from what install writes"


@pytest.mark.parametrize("role", ["hub", "agent"])
def test_the_namespace_hardening_is_in_the_drop_in_only(role):
    unit, dropin = bam.unit_files(role).values()
    unit_lines = set(unit.splitlines())
    assert [line for line in dropin.splitlines() if "=" in line and not line.startswith("#")] \
        == list(bam.NAMESPACE_HARDENING)
    assert not unit_lines & set(bam.NAMESPACE_HARDENING)
    assert set(bam.MOUNT_HARDENING) <= unit_lines  # the probe tries what the unit has
    assert f"Environment=BACKEND_AI_ROLE={role}" in unit_lines


class FakeRun:
    def __init__(self, code, journal=""):
        self.code, self.journal, self.calls = code, journal, []

    def __call__(self, argv, timeout):
        self.calls.append(argv)
        if argv[0] == "journalctl":
            return bam.CommandResult(argv, 0, self.journal, "", False)
        return bam.CommandResult(argv, self.code, "", "", False)


def test_the_probe_carries_the_units_mount_hardening_and_the_extra(monkeypatch):
    monkeypatch.setenv(bam.PROBE_EXTRA, "-p ReadOnlyPaths=/nonexistent")
    run = FakeRun(0)
    assert bam.probe_hardening(run) == (None, "")
    argv = run.calls[0]
    assert argv[:4] == ["systemd-run", "--wait", "--quiet", "--collect"]
    properties = [argv[i + 1] for i, word in enumerate(argv) if word == "-p"]
    assert properties == ["DefaultDependencies=no", *bam.MOUNT_HARDENING,
                          *bam.NAMESPACE_HARDENING, "ReadOnlyPaths=/nonexistent"]
    assert argv[-1] == "/bin/true"


def test_a_failed_probe_says_what_systemd_said():
    journal = ("Started probe.\nprobe: Failed to set up mount namespacing: /run/systemd/"
               "unit-root/proc: Permission denied\nprobe: Failed at step NAMESPACE spawning "
               "/bin/true: Permission denied\nprobe: Main process exited, status=226\n")
    code, words = bam.probe_hardening(FakeRun(226, journal))
    assert code == 226
    assert words.splitlines() == [
        "probe: Failed to set up mount namespacing: /run/systemd/unit-root/proc: "
        "Permission denied", "probe: Failed at step NAMESPACE spawning /bin/true: "
        "Permission denied"]


def flags(**values):
    return {name: values.get(name) for name, *_ in bam.OPTIONS}


def test_the_plan_holds_the_options_given_and_the_drop_in_only_if_the_probe_passed():
    given = flags(role="agent", port="3999", require_checksum=True, allowed_hosts="a.lan")
    plan = bam.install_plan("agent", given, (None, ""))
    defaults = plan["/etc/default/ai-agent-manager"][0].decode().splitlines()
    assert defaults[1:] == ["BACKEND_AI_PORT=3999", "BACKEND_AI_REQUIRE_CHECKSUM=yes",
                            "BACKEND_AI_ALLOWED_HOSTS=a.lan"]
    dropin = "/etc/systemd/system/ai-agent-manager.service.d/hardening.conf"
    assert plan[dropin][0] is not None
    with open(MANAGER, "rb") as f:
        assert plan["/usr/local/lib/backend-ai-manager/backend_ai_manager.py"] == (
            f.read(), 0o755)
    assert bam.install_plan("agent", given, (226, "no"))[dropin] == (None, 0o644)


def test_install_needs_a_running_systemd(monkeypatch):
    real = os.path.isdir
    monkeypatch.setattr(bam.os.path, "isdir",
                        lambda path: False if path == "/run/systemd/system" else real(path))
    monkeypatch.setattr(bam, "probe_hardening", lambda: pytest.fail("probed"))
    with pytest.raises(bam.ManagerError, match="systemd is not running on this host"):
        bam.install(flags(role="hub"))


@pytest.mark.parametrize("args, message", [
    (["--role", "hub", "--port", "99999"], "invalid --port"),
    (["--role", "agent", "--agents", "127.0.0.2"], "--agents (command line) is a hub setting"),
    (["--role", "hub", "--allowed-hosts", "a b"], "not a DNS name"),
])
def test_install_refuses_bad_settings_before_anything(args, message):
    run = subprocess.run([sys.executable, MANAGER, "install", *args], capture_output=True,
                         text=True, timeout=30)
    assert run.returncode == 2 and message in run.stderr and run.stdout == ""
