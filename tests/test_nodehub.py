"""The real Node hub (tests/nodehub.py, tests/fixtures/node-hub) on its own: built with npm ci and
tsc, run with node directly (no systemd, no root). Under CI=true a missing node or npm, or a failed
npm ci, fails these tests instead of skipping them."""

import json
import os
import subprocess
import tarfile
import time
import urllib.request

import pytest

import nodehub
from support import free_port


def _skip_or_fail(reason):
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true but the node hub cannot be built: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def prepared(work_dir):
    reason = nodehub.unavailable_reason()
    if reason:
        _skip_or_fail(reason)
    try:
        return nodehub.prepare(work_dir)
    except RuntimeError as e:
        _skip_or_fail(str(e))


@pytest.fixture(scope="module")
def release(prepared, work_dir):
    return nodehub.build(prepared, "9.9.9", os.path.join(work_dir, "nodehub-test", "build-9.9.9"))


def start_hub(main, cwd, env=None):
    """Run `node main` in cwd on a free loopback port; return (process, port) once GET / answers."""
    port = free_port()
    proc = subprocess.Popen([nodehub.NODE, main], cwd=cwd, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=dict(os.environ, PORT=str(port), **(env or {})))
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            pytest.fail(f"the hub exited with code {proc.returncode}: {proc.stdout.read()!r}")
        try:
            get(port)
            return proc, port
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"the hub did not answer within 30 s: {proc.communicate()[0]!r}")
            time.sleep(0.05)


def get(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
        assert response.headers["Content-Type"].startswith("application/json")
        return json.loads(response.read())


def stop(proc):
    proc.terminate()
    out, _ = proc.communicate(timeout=10)
    return out.decode()


def test_serves_its_version_the_operators_greeting_and_its_code(release, tmp_path):
    install = tmp_path / "install dir"
    install.mkdir()
    (install / "config.json").write_text(json.dumps({"greeting": "hello from config.json"}))
    proc, port = start_hub(os.path.join(release, "dist", "index.js"), str(install))
    try:
        assert get(port) == {"name": "@proxmox-ai-control/hub", "version": "9.9.9",
                             "greeting": "hello from config.json", "code": "hub code of 9.9.9"}
    finally:
        out = stop(proc)
    assert f"@proxmox-ai-control/hub 9.9.9 listening on 127.0.0.1:{port}\n" in out
    assert sorted(os.listdir(install)) == ["config.json"]  # it wrote nothing


def test_greeting_is_null_without_config_json(release, tmp_path):
    proc, port = start_hub(os.path.join(release, "dist", "index.js"), str(tmp_path))
    try:
        assert get(port)["greeting"] is None
    finally:
        stop(proc)


def test_a_crash_build_exits_with_code_3(prepared, work_dir, tmp_path):
    broken = nodehub.build(prepared, "9.9.10", os.path.join(work_dir, "nodehub-test", "broken"),
                           crash=True)
    run = subprocess.run([nodehub.NODE, os.path.join(broken, "dist", "index.js")], cwd=str(tmp_path),
                         env=dict(os.environ, PORT=str(free_port())), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, timeout=30)
    assert run.returncode == 3, run.stdout
    assert b"9.9.10" in run.stdout and b"broken" in run.stdout


def test_HUB_CRASH_AT_START_makes_a_good_build_exit_with_code_3(release, tmp_path):
    run = subprocess.run([nodehub.NODE, os.path.join(release, "dist", "index.js")],
                         cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         env=dict(os.environ, PORT=str(free_port()), HUB_CRASH_AT_START="1"),
                         timeout=30)
    assert run.returncode == 3, run.stdout


def test_the_release_and_its_tarball(release, work_dir):
    assert sorted(os.listdir(release)) == sorted(nodehub.RELEASE_ENTRIES)
    tsc = os.path.join(release, "node_modules", ".bin", "tsc")
    assert os.path.islink(tsc)
    target = os.readlink(tsc)
    assert not os.path.isabs(target) and target.startswith("../")
    assert os.path.realpath(tsc).startswith(os.path.realpath(release) + os.sep)
    assert os.access(tsc, os.X_OK)
    with open(os.path.join(release, "package.json")) as f:
        assert json.load(f)["version"] == "9.9.9"
    with open(os.path.join(release, "package-lock.json")) as f:
        lock = json.load(f)
    assert lock["lockfileVersion"] == 3 and lock["packages"][""]["version"] == "9.9.9"

    tarball = nodehub.pack(release, os.path.join(work_dir, "nodehub-test", "nas", "9.9.9",
                                                 "hub-9.9.9.tar.gz"))
    with tarfile.open(tarball) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert "./" in members or "." in members  # `tar czf T -C build .`
    assert {"./package.json", "./package-lock.json", "./dist/index.js", "./dist/code.txt",
            "./node_modules/express/package.json"} <= set(members)
    link = members["./node_modules/.bin/tsc"]
    assert link.issym() and link.linkname == target
    assert members["./dist/index.js"].mode == 0o644
    assert not any(name.startswith(("./src", "./tsconfig")) for name in members)


def test_extra_files_are_added_inside_the_release(prepared, work_dir):
    dest = nodehub.build(prepared, "9.9.11", os.path.join(work_dir, "nodehub-test", "extra"),
                         extra={"dist/assets/big.bin": b"x" * 1000})
    assert os.path.getsize(os.path.join(dest, "dist", "assets", "big.bin")) == 1000
    with pytest.raises(ValueError):
        nodehub.build(prepared, "9.9.12", os.path.join(work_dir, "nodehub-test", "bad"),
                      extra={"../outside": b""})


def test_unit_text_quotes_the_install_dir_for_systemd():
    text = nodehub.unit_text("/srv/my hub/100%$x\"q", 3123, ["DynamicUser=yes"])
    lines = text.splitlines()
    assert "Type=simple" in lines and "Restart=on-failure" in lines and "RestartSec=1" in lines
    assert "WorkingDirectory=/srv/my hub/100%%$x\"q" in lines
    assert "Environment=PORT=3123" in lines
    assert 'ExecStart=/usr/bin/node "/srv/my hub/100%%$$x\\"q/dist/index.js"' in lines
    assert lines[-1] == "DynamicUser=yes"
    assert lines.index("[Service]") < lines.index("DynamicUser=yes")
    with pytest.raises(ValueError):
        nodehub.unit_text("/srv/hub\n[Service]", 3000)
    with pytest.raises(ValueError):
        nodehub.unit_text("/srv/hub\\x", 3000)
    assert nodehub._exec_word('a\\b') == '"a\\\\b"'
