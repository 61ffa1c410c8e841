"""End to end: hostile and broken releases against the real manager, systemd and NAS. Each must end
`failed` (or `rolled_back` for one that installs but is unhealthy) with a clear error, leave the
install byte-for-byte unchanged (the whole tree the service sees, links and execute bits
included), and leave the service, the real Node hub, running untouched. The hostile members ride
in the small stand-in release of support.release_files(): they are refused before anything runs.
Run under Debian's /usr/bin/python3 (tarfile without filters), pyenv 3.9 and 3.13."""

import gzip
import io
import os
import shutil
import tarfile

import pytest

from support import Host, make_tarball, release_files, release_members, tar_bytes
from conftest import INTERPRETERS, interpreter


def tarball(members, version, extra_first=True):
    """A .tar.gz of a valid release of `version` plus hostile `members` [(TarInfo fields,
    data)], before or after the release's own."""
    good = release_members(release_files(version))
    return tar_bytes(members + good if extra_first else good + members, gzip_level=9)


def sym(name, target):
    return (dict(name=name, type=tarfile.SYMTYPE, linkname=target), None)


def reg(name, data=b"evil\n"):
    return (dict(name=name, mode=0o644), data)


ESCAPE = "../../../../../../../../../../var/tmp/bam-escape"

# name -> (tarball bytes for version, words expected in the error); None means built elsewhere
CASES = {
    "dotdot": ([reg(ESCAPE)], "'..'"),
    "absolute": ([reg("/var/tmp/bam-escape")], "absolute"),
    "symlink-escape": ([sym("dist/evil", "../../../../../../var/tmp")], "outside the release"),
    "symlink-absolute": ([sym("dist/evil", "/etc")], "outside the release"),
    "symlink-chain": ([sym("dist/here", "."), sym("dist/up", "here/../../..")],
                      "outside the release"),
    "hardlink-escape": ([(dict(name="dist/h", type=tarfile.LNKTYPE, linkname="/etc/passwd"),
                          None)], "absolute"),
    "hardlink-missing": ([(dict(name="dist/h", type=tarfile.LNKTYPE,
                                linkname="dist/nothere"), None)], "not a file of this release"),
    "through-symlink": ([sym("dist/l", "."), reg("dist/l/x")], "passes through the symlink"),
    "device": ([(dict(name="dist/null", type=tarfile.CHRTYPE, devmajor=1, devminor=3), None)],
               "device"),
    "fifo": ([(dict(name="dist/fifo", type=tarfile.FIFOTYPE), None)], "FIFO"),
    "duplicate": ([reg("dist/server.py", b"print('shadow')\n")], "twice"),
    "bomb": ([reg("dist/bomb.bin", b"\0" * (20 << 20))], "over the limit"),
}


@pytest.fixture(scope="module", params=sorted(INTERPRETERS))
def host(request, sandbox, nas, work_dir, node_hub):
    python = interpreter(request.param)
    base = os.path.join(work_dir, f"hostile-{request.param}")
    os.makedirs(base)
    h = Host(sandbox, base, nas, python=python, settle=1, env={
        "BACKEND_AI_DOWNLOAD_TIMEOUT": "3", "BACKEND_AI_MAX_FILE_MB": "16",
        "BACKEND_AI_MAX_UNPACKED_MB": "64"}, node=node_hub)
    h.env["BACKEND_AI_HEALTH_URL"] = f"http://127.0.0.1:{h.service_port}/health"
    h.install_base("2.0.10")
    h.start()
    # one good update first, so the install is in the manager's layout with a kept release
    h.publish("5.0.0")
    assert h.api("POST", "/update", {"version": "5.0.0"})[0] == 200
    record = h.wait_update()
    assert record["state"] == "succeeded", record
    h.assert_installed("5.0.0")
    yield h
    h.stop()
    shutil.rmtree(base, ignore_errors=True)


def expect_unchanged_failure(host, version, words, state="failed"):
    view, pid = host.view(), host.main_pid()
    releases = sorted(os.listdir(os.path.join(host.state_dir, "releases")))
    status, body = host.api("POST", "/update", {"version": version})
    assert status == 200, body
    record = host.wait_update()
    assert record["state"] == state, record
    assert words in record["error"], record
    assert host.view() == view
    host.assert_installed("5.0.0")
    assert sorted(os.listdir(os.path.join(host.state_dir, "releases"))) == releases
    assert os.listdir(os.path.join(host.state_dir, "staging")) == []
    assert not os.path.lexists("/var/tmp/bam-escape")
    assert host.is_active() == "active"
    if state == "failed":
        assert host.main_pid() == pid  # not even restarted
    assert host.service_info()["version"] == "5.0.0"
    return record


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_archive_is_refused(host, nas, case):
    members, words = CASES[case]
    version = f"6.0.0-{case}"
    nas.publish(version, None, tarball=tarball(members, version))
    expect_unchanged_failure(host, version, words)


def test_wrong_version_in_package_json(host, nas):
    nas.publish("6.1.0", release_files("6.1.1"))
    expect_unchanged_failure(host, "6.1.0", "says version '6.1.1'")


def test_checksum_mismatch(host, nas):
    path = nas.publish("6.2.0", release_files("6.2.0"))
    with open(path + ".sha256", "w") as f:
        f.write("0" * 64 + "  hub-6.2.0.tar.gz\n")
    expect_unchanged_failure(host, "6.2.0", "checksum mismatch")


def test_truncated_download(host, nas):
    nas.publish("6.3.0", release_files("6.3.0", extra={"dist/pad.bin": os.urandom(300000)}))
    nas.faults[nas.path_of("6.3.0")] = "truncate"
    expect_unchanged_failure(host, "6.3.0", "truncated")


def test_corrupt_gzip(host, nas):
    good = io.BytesIO()
    make_tarball(good, release_files("6.4.0", extra={"dist/pad.txt": b"abc" * 20000}))
    data = bytearray(good.getvalue())
    data[len(data) // 2] ^= 0x55
    nas.publish("6.4.0", None, tarball=bytes(data), checksum=False)
    record = expect_unchanged_failure(host, "6.4.0", "")
    assert "gzip" in record["error"] or "tar" in record["error"], record


def test_not_gzip_at_all(host, nas):
    nas.publish("6.4.1", None, tarball=b"<html>not a tarball</html>\n" * 10, checksum=False)
    expect_unchanged_failure(host, "6.4.1", "not valid gzip")


def test_plain_tar_without_package_json(host, nas):
    raw = io.BytesIO()
    with gzip.GzipFile(fileobj=raw, mode="wb") as gz, tarfile.open(fileobj=gz, mode="w") as t:
        info = tarfile.TarInfo("dist/x.js")
        info.size = 2
        t.addfile(info, io.BytesIO(b"x\n"))
    nas.publish("6.4.2", None, tarball=raw.getvalue())
    expect_unchanged_failure(host, "6.4.2", "package.json does not exist")


def test_release_missing_on_the_nas(host):
    expect_unchanged_failure(host, "6.5.0", "404")


def test_nas_error_status(host, nas):
    nas.publish("6.6.0", release_files("6.6.0"))
    nas.faults[nas.path_of("6.6.0")] = "status:500"
    expect_unchanged_failure(host, "6.6.0", "HTTP 500")


def test_nas_that_never_answers_hits_the_deadline(host, nas):
    nas.publish("6.7.0", release_files("6.7.0"))
    nas.faults[nas.path_of("6.7.0")] = "hang"
    expect_unchanged_failure(host, "6.7.0", "timed out")


def test_nas_trickling_bytes_hits_the_total_deadline(host, nas):
    nas.publish("6.7.1", release_files("6.7.1"))
    nas.faults[nas.path_of("6.7.1")] = "trickle"
    expect_unchanged_failure(host, "6.7.1", "deadline")


def test_release_failing_its_health_url_is_rolled_back(host, nas):
    host.publish("6.8.0", extra={"dist/health-status": b"503\n"})
    record = expect_unchanged_failure(host, "6.8.0", "health URL", state="rolled_back")
    assert "503" in record["error"]


def test_release_crashing_at_start_is_rolled_back(host, nas):
    host.publish("6.9.0", crash=True)
    expect_unchanged_failure(host, "6.9.0", "ai-hub.service", state="rolled_back")
