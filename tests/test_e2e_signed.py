"""Signed releases, with the real ssh-keygen, the real NAS and the shipped hardened unit in the
sandboxed systemd: a release packed with `pack --sign` installs on a manager that trusts the key;
forged, altered, unsigned and foreign-key releases fail with the install byte for byte unchanged;
a manager rides along only in a release whose signature held; a hub and two agents, each with
its own allowed_signers file, roll out a signed release and halt on a forged one."""

import hashlib
import os
import shutil
import subprocess
import sys
import time

import pytest

from support import MANAGER, Host, bam, fleet_hosts, release_files, started_hosts
from test_e2e_self_update import (manager, manager_variant, publish_with, roll,
                                  wait_manager_state)

PYTHON = "/usr/bin/python3"
BASE = bam.__version__


def keygen(*args):
    return subprocess.run(["ssh-keygen", *args], check=True, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True).stdout


@pytest.fixture(scope="module")
def keys(work_dir):
    """The owner's release key, a stranger's key, and an allowed_signers file trusting the
    owner's key only."""
    if not shutil.which("ssh-keygen"):
        pytest.fail("ssh-keygen is missing (apt-get install openssh-client; .ci/run does)")
    folder = os.path.join(work_dir, "keys")
    os.makedirs(folder)
    for name in ("release", "stranger"):
        keygen("-q", "-t", "ed25519", "-N", "", "-C", name, "-f", os.path.join(folder, name))
    allowed = os.path.join(folder, "allowed_signers")
    with open(os.path.join(folder, "release.pub")) as f:
        public = f.read().strip()
    with open(allowed, "w") as f:
        f.write(f"# the fleet's owner\nrelease@fleet {public}\n")
    fingerprints = {name: keygen("-lf", os.path.join(folder, f"{name}.pub")).split()[1]
                    for name in ("release", "stranger")}
    yield folder, allowed, fingerprints
    shutil.rmtree(folder, ignore_errors=True)


def sign(path, key, namespace=bam.SIGN_NAMESPACE):
    if os.path.exists(path + ".sig"):
        os.unlink(path + ".sig")
    keygen("-Y", "sign", "-f", key, "-n", namespace, path)


def sha256_line(tarball):
    with open(tarball, "rb") as f:
        return f"{hashlib.sha256(f.read()).hexdigest()}  {os.path.basename(tarball)}\n"


@pytest.fixture(scope="module")
def signed_host(sandbox, nas, work_dir, keys):
    base = os.path.join(work_dir, "signed")
    host = Host(sandbox, base, nas, python=PYTHON, settle=0.5, name="signed",
                env={"BACKEND_AI_RELEASE_SIGNERS": keys[1], "BACKEND_AI_MANAGER_TRIAL": "3"})
    host.install_base("2.0.10")
    host.start()
    yield host
    host.stop()
    shutil.rmtree(base, ignore_errors=True)


def update(host, version):
    status, answer = host.api("POST", "/update", {"version": version})
    assert status == 200, answer
    return host.wait_update()


def test_a_release_packed_with_sign_installs_on_a_manager_that_trusts_the_key(
        signed_host, keys, tmp_path):
    host = signed_host
    folder, allowed, fingerprints = keys
    assert host.api("GET", "/status")[1]["manager"]["release_signers"] == allowed
    build = tmp_path / "build"
    for name, data in release_files("2.0.11").items():
        path = build / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, tuple):
            os.symlink(data[1], path)
        else:
            path.write_bytes(data)
    run = subprocess.run([sys.executable, MANAGER, "pack", str(build), "--kind", "hub", "--out",
                          host.nas.root, "--sign", os.path.join(folder, "release")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert run.returncode == 0, run.stderr
    tarball = host.nas.tarball("2.0.11")
    assert f"signed: {tarball}.sha256.sig" in run.stdout, run.stdout
    record = update(host, "2.0.11")
    assert record["state"] == "succeeded", record
    assert record["signed"] == {"principal": "release@fleet", "key": fingerprints["release"]}
    assert any("signed by release@fleet" in e["message"] for e in record["log"]), record["log"]
    host.assert_installed("2.0.11")  # GNU tar's extraction of the packed tarball


def forge_changed_tarball(host, keys, version):
    """Signed, then the tarball replaced and its .sha256 recomputed, as an attacker would."""
    tarball = host.publish(version)
    sign(tarball + ".sha256", os.path.join(keys[0], "release"))
    host.nas.publish(version, release_files(version, extra={"dist/evil.js": b"evil"}),
                     checksum=False)
    with open(tarball + ".sha256", "w") as f:
        f.write(sha256_line(tarball))


def forge_changed_sums(host, keys, version):
    tarball = host.publish(version)
    sign(tarball + ".sha256", os.path.join(keys[0], "release"))
    with open(tarball + ".sha256", "w") as f:
        f.write("0" * 64 + f"  {os.path.basename(tarball)}\n")


def forge_no_signature(host, keys, version):
    host.publish(version)


def forge_stranger(host, keys, version):
    tarball = host.publish(version)
    sign(tarball + ".sha256", os.path.join(keys[0], "stranger"))


def forge_other_namespace(host, keys, version):
    tarball = host.publish(version)
    sign(tarball + ".sha256", os.path.join(keys[0], "release"), namespace="file")


FORGERIES = [
    ("tarball changed, .sha256 recomputed", forge_changed_tarball,
     "signature by release@fleet ({release}) does not hold: Signature verification failed"),
    (".sha256 changed", forge_changed_sums,
     "signature by release@fleet ({release}) does not hold: Signature verification failed"),
    (".sig missing", forge_no_signature, "sha256.sig, and --release-signers is set"),
    ("a key not in allowed_signers", forge_stranger,
     "signed by a key that {allowed} does not list ({stranger})"),
    ("another namespace", forge_other_namespace,
     "signature by release@fleet ({release}) is for 'file', not 'backend-ai-release'"),
]


@pytest.mark.parametrize("case, forge, words", FORGERIES, ids=[c for c, _, _ in FORGERIES])
def test_a_release_that_is_not_signed_as_it_should_changes_nothing(
        signed_host, keys, case, forge, words):
    host = signed_host
    version = f"2.0.{20 + [c for c, _, _ in FORGERIES].index(case)}"
    forge(host, keys, version)
    before = host.view()
    pid = host.main_pid()
    record = update(host, version)
    assert record["state"] == "failed", record
    expected = words.format(allowed=keys[1], **keys[2])
    assert expected in record["error"], (case, record["error"])
    assert record["bytes"] == 0  # refused before the download
    assert host.view() == before  # the whole install, byte for byte
    host.assert_installed("2.0.11")
    assert host.main_pid() == pid and host.service_info()["version"] == "2.0.11"
    assert os.listdir(os.path.join(host.state_dir, "staging")) == []


def test_a_manager_rides_along_only_in_a_release_whose_signature_held(signed_host, keys):
    host = signed_host
    newer = f"{BASE}.40"
    # Installed while the manager checked no signatures (and took no manager): current, but
    # never verified. With signers and manager updates on again, its manager is not taken.
    host.restart_manager(BACKEND_AI_RELEASE_SIGNERS=None, BACKEND_AI_MANAGER_UPDATES="off")
    publish_with(host, "2.0.30", manager_variant(newer))
    assert update(host, "2.0.30")["state"] == "succeeded"
    host.assert_installed("2.0.30")
    host.restart_manager()
    time.sleep(3)
    view = manager(host)
    assert view["version"] == BASE and view["self_update"] is None, view
    # The same manager in a signed release: taken.
    publish_with(host, "2.0.31", manager_variant(newer))
    sign(host.nas.tarball("2.0.31") + ".sha256", os.path.join(keys[0], "release"))
    record = update(host, "2.0.31")
    assert record["state"] == "succeeded" and record["manager_update"] == newer, record
    host.assert_installed("2.0.31")
    wait_manager_state(host, lambda m: m["version"] == newer and m["state"] == "good")


@pytest.mark.parametrize("hide, signers, words", [
    (True, None, "ssh-keygen (OpenSSH, Debian 11 or newer) is not installed"),
    (False, "/nonexistent/allowed", "cannot read it: No such file or directory")])
def test_signers_that_cannot_be_checked_stop_the_start_in_one_line(
        signed_host, keys, hide, signers, words):
    """`serve` run by hand with the unit's settings, in a mount namespace where ssh-keygen is
    /dev/null (not executable: missing), or with an allowed_signers file that is not there."""
    host = signed_host
    environ = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "BACKEND_AI_ROLE": host.role,
               **host.env, "BACKEND_AI_RELEASE_SIGNERS": signers or keys[1]}
    hiding = "mount --bind /dev/null /usr/bin/ssh-keygen && " if hide else ""
    run = host.sandbox.run(["unshare", "-m", "sh", "-c",
                            f'{hiding}exec {PYTHON} "$0" serve', host.manager], env=environ)
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert "BACKEND_AI_RELEASE_SIGNERS" in run.stderr and words in run.stderr, run.stderr
    assert host.api("GET", "/status")[0] == 200  # the unit's manager was never disturbed


# --- a hub and two agents, each with its own allowed_signers file ------------------------------
TOKEN = "signed-fleet-token-0123456789"
AGENTS = ["127.0.6.11:3081", "127.0.6.12:3081"]


@pytest.fixture(scope="module")
def signed_fleet(sandbox, nas, work_dir, keys):
    base = os.path.join(work_dir, "signed-fleet")
    os.makedirs(base)
    token = os.path.join(base, "token")
    with open(token, "w") as f:
        f.write(TOKEN + "\n")
    hub, agents, _ = fleet_hosts(
        sandbox, base, nas, AGENTS, token, {"BACKEND_AI_ROLLOUT_BATCHES": "1,100%"},
        agent_name=lambda n: f"signed{n}", python=PYTHON, settle=0.5)
    for host in [hub] + agents:  # each host its own copy of the file: no trust passed on
        own = os.path.join(host.base, "allowed_signers")
        os.makedirs(host.base, exist_ok=True)
        shutil.copyfile(keys[1], own)
        host.env["BACKEND_AI_RELEASE_SIGNERS"] = own
    try:
        with started_hosts(agents + [hub]):
            yield hub, agents
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_a_signed_rollout_installs_and_a_forged_agent_release_halts_at_the_canary(
        signed_fleet, keys):
    hub, agents = signed_fleet
    key = os.path.join(keys[0], "release")
    for host in (hub, agents[0]):  # the hub's release and the agents' (one NAS)
        sign(host.publish("2.3.0") + ".sha256", key)
    record = roll(hub, "2.3.0")
    assert record["state"] == "succeeded" and record["agents"]["state"] == "succeeded", record
    for host in [hub] + agents:
        host.assert_installed("2.3.0")
    # 2.3.1: the hub's release signed; the agents' signed by a stranger.
    sign(hub.publish("2.3.1") + ".sha256", key)
    sign(agents[0].publish("2.3.1") + ".sha256", os.path.join(keys[0], "stranger"))
    record = roll(hub, "2.3.1")
    hub.assert_installed("2.3.1")
    rollout = record["agents"]
    assert rollout["state"] == "halted", rollout
    canary, second = rollout["agents"]
    assert canary["state"] == "failed" and "does not list" in canary["error"], canary
    assert second["state"] == "waiting", second  # never sent
    for agent in agents:
        agent.assert_installed("2.3.0")
