"""Unit tests of the pure parts: settings, parsing, version rules, the extractor and decoders.

These need no systemd; archives are built in the test itself."""

import gzip
import io
import json
import logging
import os
import socket
import tarfile
import threading
import time
import zlib

import pytest

import backend_ai_manager as bam
from support import INTERPRETERS, make_tarball, release_files, tar_bytes
from conftest import interpreter


# --- settings -------------------------------------------------------------------------------

def flags(**kw):
    base = {name: None for name, *_ in bam.OPTIONS}
    base.update(kw)
    return base


def test_role_defaults_match_the_contract():
    hub = bam.resolve_settings(flags(role="hub"), {})
    agent = bam.resolve_settings(flags(role="agent"), {})
    assert (hub.service, hub.install_dir, hub.bind, hub.port) == \
        ("ai-hub.service", "/opt/backend-ai/hub", "127.0.0.1", 3081)
    assert (agent.service, agent.install_dir, agent.bind, agent.port) == \
        ("ai-agent.service", "/opt/backend-ai/agent", "0.0.0.0", 3081)
    assert hub.nas_url.endswith("/api/raw/{version}/hub-{version}.tar.gz")
    assert agent.nas_url.endswith("/api/raw/{version}/agent-{version}.tar.gz")
    assert (hub.keep_backups, hub.settle, hub.require_checksum) == (3, 5.0, False)
    assert hub.state_dir.startswith("/var/lib/backend-ai-manager")
    assert hub.state_dir != agent.state_dir


def test_flag_beats_environment_beats_default():
    env = {"BACKEND_AI_ROLE": "agent", "BACKEND_AI_PORT": "4000", "BACKEND_AI_SETTLE": "2.5",
           "BACKEND_AI_REQUIRE_CHECKSUM": "yes"}
    s = bam.resolve_settings(flags(port="5000"), env)
    assert s.role == "agent" and s.port == 5000 and s.settle == 2.5 and s.require_checksum
    s = bam.resolve_settings(flags(role="hub"), env)
    assert s.role == "hub" and s.port == 4000
    s = bam.resolve_settings(flags(role="hub", require_checksum=True), {})
    assert s.require_checksum is True


@pytest.mark.parametrize("kw, env, words", [
    ({}, {}, "invalid role"),
    ({"role": "hub", "port": "0"}, {}, "--port"),
    ({"role": "hub", "port": "1_0"}, {}, "--port"),
    ({"role": "hub", "port": "70000"}, {}, "--port"),
    ({"role": "hub"}, {"BACKEND_AI_PORT": "abc"}, "BACKEND_AI_PORT"),
    ({"role": "hub", "bind": "localhost"}, {}, "--bind"),
    ({"role": "hub", "service": "ai-hub"}, {}, "--service"),
    ({"role": "hub", "service": "x;rm.service"}, {}, "--service"),
    ({"role": "hub", "install_dir": "relative/dir"}, {}, "--install-dir"),
    ({"role": "hub", "nas_url": "http://127.0.0.1/hub.tar.gz"}, {}, "{version}"),
    ({"role": "hub", "nas_url": "ftp://127.0.0.1/{version}"}, {}, "--nas-url"),
    ({"role": "hub", "keep_backups": "0"}, {}, "--keep-backups"),
    ({"role": "hub", "settle": "-1"}, {}, "--settle"),
    ({"role": "hub"}, {"BACKEND_AI_REQUIRE_CHECKSUM": "maybe"}, "BACKEND_AI_REQUIRE_CHECKSUM"),
    ({"role": "hub", "health_url": "localhost:3000"}, {}, "--health-url"),
    ({"role": "hub", "token_file": "/nonexistent/token"}, {}, "--token-file"),
    ({"role": "hub", "allow": "10.0.0.0/8,nonsense"}, {}, "--allow"),
    ({"role": "hub", "install_dir": "/srv/a", "state_dir": "/srv/a/state"}, {}, "outside"),
])
def test_invalid_settings_are_refused_with_the_setting_named(kw, env, words):
    with pytest.raises(bam.ConfigError) as info:
        bam.resolve_settings(flags(**kw), env)
    assert words in str(info.value)
    assert "\n" not in str(info.value)


def test_token_file_and_allow_list_are_parsed(tmp_path):
    token = tmp_path / "token"
    token.write_text("0123456789abcdef0123\n")
    s = bam.resolve_settings(flags(role="agent", token_file=str(token),
                                   allow="127.0.0.0/8, 10.1.2.0/24"), {})
    assert s.token() == "0123456789abcdef0123"
    assert [str(n) for n in s.allow] == ["127.0.0.0/8", "10.1.2.0/24"]
    token.write_text("short\n")
    with pytest.raises(bam.ConfigError):
        bam.resolve_settings(flags(role="agent", token_file=str(token)), {})


def test_settings_are_frozen():
    s = bam.resolve_settings(flags(role="hub"), {})
    with pytest.raises(AttributeError):
        s.port = 1


# --- versions and checksums -------------------------------------------------------------------

@pytest.mark.parametrize("good", ["2.0.11", "1.0.0-rc.1", "2024.01.02+build5", "v3", "a_b"])
def test_plain_versions_are_accepted(good):
    assert bam.parse_version(good) == good


@pytest.mark.parametrize("bad", ["", "../2.0.11", "2.0/11", "2..0", ".2.0", "-rc", "2.0.11\n",
                                 "x" * 65, None, 2011, ["2.0.11"], "2.0 .11", "%2e%2e"])
def test_path_like_or_odd_versions_are_refused(bad):
    with pytest.raises(bam.InvalidInput):
        bam.parse_version(bad)


def test_checksum_file_formats():
    digest = "ab" * 32
    assert bam.parse_checksum(f"{digest}  hub-2.0.11.tar.gz\n") == digest
    assert bam.parse_checksum(digest.upper()) == digest
    for bad in ("", "abc", "zz" * 32, digest + "00"):
        with pytest.raises(bam.ReleaseError):
            bam.parse_checksum(bad)


# --- systemctl output ---------------------------------------------------------------------------

SHOW_OUTPUT = """Type=simple
Result=success
MainPID=4242
NRestarts=2
Description=Backend AI Hub
LoadState=loaded
ActiveState=active
SubState=running
ActiveEnterTimestamp=Fri 2026-11-27 21:00:05 UTC
UnitFileState=enabled
ExecStart={ path=/usr/bin/node ; argv[]=/usr/bin/node a=b ; }
"""


def test_parse_show_reads_key_value_lines_in_any_order():
    props = bam.parse_show(SHOW_OUTPUT)
    assert props["MainPID"] == "4242" and props["ActiveState"] == "active"
    assert props["ExecStart"] == "{ path=/usr/bin/node ; argv[]=/usr/bin/node a=b ; }"
    assert bam.parse_timestamp(props["ActiveEnterTimestamp"]) == "2026-11-27T21:00:05Z"
    assert bam.parse_timestamp("") is None
    assert bam.parse_timestamp("n/a") == "n/a"


def test_command_runner_kills_the_whole_group_on_timeout(tmp_path):
    """A grandchild (which subprocess's own timeout would leave running) writes its pid, then
    sleeps 30 s; after the timeout it must be gone: seen dead, not assumed from silence."""
    import time
    pidfile = tmp_path / "grandchild.pid"
    script = f"/bin/sh -c 'echo $$ > {pidfile}; exec sleep 30' & sleep 30"
    started = time.monotonic()
    result = bam.run_command(["/bin/sh", "-c", script], timeout=1.0)
    # A grandchild left alive holds the output pipe: the call would return only when it exits
    # (30 s). The bound is the command's own deadline, far from that.
    assert time.monotonic() - started < 10, "run_command waited for the grandchild"
    assert result.timed_out and not result.ok and "timed out" in result.message()
    pid = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:  # a zombie waiting to be reaped is dead
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break
        except FileNotFoundError:
            break
        time.sleep(0.05)
    else:
        assert not os.path.exists(f"/proc/{pid}"), "the grandchild survived the timeout"


def test_command_runner_uses_a_small_fixed_environment(monkeypatch):
    monkeypatch.setenv("SYSTEMD_COLORS", "1")
    result = bam.run_command(["/usr/bin/env"], timeout=5)
    env = dict(line.split("=", 1) for line in result.out.splitlines())
    assert env["SYSTEMD_COLORS"] == "0" and env["TZ"] == "UTC" and env["SYSTEMD_PAGER"] == "cat"
    assert "HOME" not in env
    missing = bam.run_command(["/nonexistent/systemctl"], timeout=5)
    assert missing.code == 127 and "cannot run" in missing.message()


def test_journal_formatter_prefixes_priorities():
    fmt = bam.JournalFormatter(journal=True)
    rec = logging.LogRecord("x", logging.ERROR, "", 0, "line one\nline two", None, None)
    assert fmt.format(rec) == "<3>line one\n<3>line two"
    rec = logging.LogRecord("x", logging.WARNING, "", 0, "w", None, None)
    assert fmt.format(rec) == "<4>w"
    rec = logging.LogRecord("x", logging.INFO, "", 0, "i", None, None)
    assert fmt.format(rec) == "<6>i"
    assert not bam.JournalFormatter(journal=False).format(rec).startswith("<")


# --- archive member rules -----------------------------------------------------------------------

@pytest.mark.parametrize("name, expected", [
    ("dist/index.js", "dist/index.js"), ("./dist/", "dist"), ("package//a.js", "package/a.js")])
def test_member_names_are_normalised(name, expected):
    assert bam.member_path(name) == expected


@pytest.mark.parametrize("name", ["/etc/passwd", "../x", "dist/../../x", "a/\0b", "", "./",
                                  "a/" + "x" * 256, "../evil/../dest/sub/file"])
def test_dangerous_member_names_are_refused(name):
    with pytest.raises(bam.ReleaseError):
        bam.member_path(name)


@pytest.mark.parametrize("link, target, root, inside", [
    ("node_modules/.bin/tsc", "../typescript/bin/tsc", "", True),
    ("package/node_modules/.bin/tsc", "../typescript/bin/tsc", "package", True),
    ("package/x", "../y", "package", False),
    ("a", "../outside", "", False),
    ("a/b", "../../x", "", False),
    ("a", "/etc/passwd", "", False),
    ("a", "", "", False),
    ("a", ".", "", True),
])
def test_symlink_targets_must_stay_inside(link, target, root, inside):
    assert bam.link_target_inside(link, target, root) is inside


# --- the extractor, on hostile archives built here ----------------------------------------------

def tar_stream(members):
    """members: list of (TarInfo fields, data or None) -> an uncompressed tar as a file object."""
    return io.BytesIO(tar_bytes(members))


def extract(tmp_path, members, max_bytes=1 << 20, max_members=100, max_file=None):
    dest = str(tmp_path / "out")
    ex = bam.Extractor(dest, max_bytes, max_members, max_file=max_file)
    root = ex.extract(tar_stream(members))
    return dest, root, ex


def f(name, data=b"x", **kw):
    return (dict(name=name, **kw), data)


def d(name):
    return (dict(name=name, type=tarfile.DIRTYPE, mode=0o755), None)


def sym(name, target):
    return (dict(name=name, type=tarfile.SYMTYPE, linkname=target), None)


def hard(name, target):
    return (dict(name=name, type=tarfile.LNKTYPE, linkname=target), None)


def test_a_release_with_links_extracts_with_sane_modes(tmp_path):
    dest, root, ex = extract(tmp_path, [
        d("dist"), f("dist/a.js", b"A", mode=0o6755), f("package.json", b"{}", mode=0o666),
        f("node_modules/typescript/bin/tsc", b"tsc", mode=0o755),
        sym("node_modules/.bin/tsc", "../typescript/bin/tsc"),
        hard("dist/b.js", "dist/a.js"),
    ])
    assert root == ""
    assert os.readlink(f"{dest}/node_modules/.bin/tsc") == "../typescript/bin/tsc"
    assert open(f"{dest}/node_modules/.bin/tsc").read() == "tsc"
    assert open(f"{dest}/dist/b.js").read() == "A"
    assert os.stat(f"{dest}/dist/a.js").st_mode & 0o7777 == 0o755  # setuid/setgid dropped
    assert os.stat(f"{dest}/package.json").st_mode & 0o7777 == 0o644  # no world write
    assert ex.written == 6


def test_a_folder_listed_after_its_files_is_fine(tmp_path):
    dest, root, _ = extract(tmp_path, [f("dist/a.js"), d("dist")])
    assert os.path.isfile(f"{dest}/dist/a.js")


def test_folders_made_by_the_writer_threads_come_before_what_goes_in_them(tmp_path):
    # Folders and small files are made by the pool's threads, each after its folder; big files
    # are streamed by the parsing thread once their folder exists.
    big = os.urandom(bam.Extractor.SMALL + 1000)
    members = []
    for i in range(60):
        members += [f(f"m/p{i}/lib/sub{j}/x{j}.js", b"%d-%d" % (i, j)) for j in range(4)]
        if i % 20 == 0:
            members.append(f(f"m/p{i}/deep/er/big.bin", big))
    dest, root, ex = extract(tmp_path, members, max_bytes=10 << 20, max_members=2000)
    for i in range(60):
        for j in range(4):
            assert open(f"{dest}/m/p{i}/lib/sub{j}/x{j}.js", "rb").read() == b"%d-%d" % (i, j)
    for i in (0, 20, 40):
        assert open(f"{dest}/m/p{i}/deep/er/big.bin", "rb").read() == big
    assert len(ex.dirs) == 1 + 1 + 60 * 6 + 3 * 2  # '', m, per package 6, 2 more with big.bin


def test_a_folder_the_pool_cannot_make_fails_the_files_in_it_without_hanging(tmp_path):
    pool = bam.WriterPool(threads=2)
    try:
        made = bam.threading.Event()
        pool.submit(str(tmp_path / "missing" / "dir"), None, 0o755, done=made)
        pool.submit(str(tmp_path / "missing" / "dir" / "f"), b"data", 0o644, after=made)
        with pytest.raises(bam.ReleaseError, match="cannot write .*missing/dir"):
            pool.drain()
        assert made.is_set() and not os.path.exists(tmp_path / "missing")
        with pytest.raises(bam.ReleaseError):  # and nothing more is taken
            pool.submit(str(tmp_path / "g"), b"x", 0o644)
    finally:
        pool.close()


def test_flusher_flushes_through_one_descriptor_and_refuses_a_file(tmp_path):
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(NotADirectoryError):
        bam.Flusher(str(tmp_path / "file"))
    flusher = bam.Flusher(str(tmp_path))
    fd = flusher.fd
    real, calls = flusher._syncfs, []
    assert real is not None  # glibc has syncfs(2)
    flusher._syncfs = lambda fd: (calls.append(fd), real(fd))[1]
    flusher.start()
    assert flusher._thread.is_alive()
    (tmp_path / "data").write_bytes(b"y" * 100000)
    deadline = time.monotonic() + 10
    while not calls and time.monotonic() < deadline:  # the background flushes
        time.sleep(0.01)
    flusher.stop()
    flusher._thread.join(10)
    background = len(calls)
    flusher.finish()  # no error on a healthy disk
    assert background >= 1 and len(calls) == background + 1  # + the last flush
    assert set(calls) == {fd}  # all through the one descriptor
    assert not flusher._thread.is_alive() and flusher.fd == fd
    flusher.close()
    assert flusher.fd is None
    with pytest.raises(OSError):
        os.fstat(fd)


def test_a_write_error_a_background_flush_saw_is_raised_by_the_last_one(tmp_path):
    # The kernel reports a write error once per open file: if a background syncfs() collected
    # it, the last one returns 0, so the flusher must remember it. (A stand-in for syncfs on a
    # failing disk.)
    import ctypes
    calls = []

    def syncfs(fd):
        calls.append(fd)
        if len(calls) == 1:
            ctypes.set_errno(5)  # EIO
            return -1
        return 0

    flusher = bam.Flusher(str(tmp_path))
    flusher._syncfs = syncfs
    flusher.INTERVAL = 0.01
    flusher.start()
    flusher._thread.join(timeout=10)  # the thread ends at the first error
    with pytest.raises(OSError) as info:
        flusher.finish()
    flusher.close()
    assert info.value.errno == 5 and len(calls) == 2 and set(calls) == {calls[0]}


def test_a_writer_that_fails_unexpectedly_fails_the_extraction_instead_of_hanging(tmp_path,
                                                                                 monkeypatch):
    def broken(path, data, mode):
        raise ValueError("boom")
    monkeypatch.setattr(bam, "_create", broken)
    with pytest.raises(bam.ReleaseError, match="internal error: boom"):
        extract(tmp_path, [f(f"d/f{i}") for i in range(20)])


def test_a_single_wrapping_folder_is_the_release_root(tmp_path):
    dest, root, _ = extract(tmp_path, [f("package/package.json", b"{}"),
                                       f("package/dist/x.js"),
                                       sym("package/node_modules/.bin/t", "../t/bin")])
    assert root == "package"


@pytest.mark.parametrize("members, words", [
    ([f("../evil")], "'..'"),
    ([f("/abs")], "absolute"),
    ([f("a"), f("a")], "twice"),
    ([sym("link", "../../etc")], "outside"),
    ([sym("link", "/etc")], "outside"),
    ([sym("dir", "."), sym("esc", "dir/../x")], "outside"),
    ([sym("link", "sub"), d("sub"), f("link/file")], "symlink"),
    ([f("a"), f("a/b")], "below the file"),
    ([f("a/b"), f("a")], "replaces a directory"),
    ([hard("h", "/etc/passwd")], "absolute"),
    ([hard("h", "nothere")], "not a file of this release"),
    ([(dict(name="dev", type=tarfile.CHRTYPE, devmajor=1, devminor=3), None)], "device"),
    ([(dict(name="blk", type=tarfile.BLKTYPE), None)], "device"),
    ([(dict(name="fifo", type=tarfile.FIFOTYPE), None)], "FIFO"),
    ([(dict(name="c", type=tarfile.CONTTYPE), b"x")], "special"),
    ([f("big", b"x" * 2000)], "over the limit of 900 bytes for one file"),
    ([f("a", b"x" * 800), f("b", b"x" * 800)], "more than 1000 bytes"),
    ([f(f"f{i}") for i in range(6)], "more than 5 members"),
])
def test_hostile_members_are_refused(tmp_path, members, words):
    with pytest.raises(bam.ReleaseError) as info:
        extract(tmp_path, members, max_bytes=1000, max_members=5, max_file=900)
    assert words in str(info.value)


def test_nothing_is_written_outside_the_destination(tmp_path):
    for i, members in enumerate(([sym("dir", "."), sym("esc", "dir/../x"), f("esc/y")],
                                 [f("../x")], [sym("l", ".."), f("l/x")])):
        sub = tmp_path / str(i)
        sub.mkdir()
        with pytest.raises(bam.ReleaseError):
            extract(sub, members)
        assert os.listdir(sub) == ["out"]


# --- gzip stream ------------------------------------------------------------------------------

def chunks(data, size=100):
    it = iter(data[i:i + size] for i in range(0, len(data), size))
    return lambda n: next(it, b"")


def test_gunzip_decodes_and_checks_the_trailer():
    raw = os.urandom(50000) + b"a" * 300000
    gz = gzip.compress(raw)
    g = bam.Gunzip(chunks(gz))
    out = b"".join(iter(lambda: g.read(10240), b""))
    g.finish()
    assert out == raw
    corrupt = bytearray(gz)
    corrupt[-6] ^= 0xFF  # CRC-32 in the trailer
    g = bam.Gunzip(chunks(bytes(corrupt)))
    with pytest.raises(bam.ReleaseError, match="not valid gzip"):
        while g.read(10240):
            pass
    g = bam.Gunzip(chunks(gz[:len(gz) // 2]))
    with pytest.raises(bam.ReleaseError, match="truncated"):
        while g.read(10240):
            pass
    g = bam.Gunzip(chunks(gz + b"junk"))
    while g.read():
        pass
    with pytest.raises(bam.ReleaseError, match="after the end"):
        g.finish()


def test_gunzip_memory_stays_bounded_on_a_bomb():
    bomb = zlib.compressobj(9, zlib.DEFLATED, 31)
    gz = bomb.compress(b"\0" * (64 << 20)) + bomb.flush()
    g = bam.Gunzip(chunks(gz, 65536))
    biggest = max(len(g.read(1 << 30)) for _ in range(20))
    assert biggest <= bam.CHUNK


def test_demo_release_tarball_extracts(tmp_path):
    path = make_tarball(str(tmp_path / "r.tar.gz"), release_files("2.0.11"), wrap="package")
    with open(path, "rb") as fh:
        g = bam.Gunzip(fh.read)
        ex = bam.Extractor(str(tmp_path / "x"), 1 << 30, 1000)
        root = ex.extract(g)
    assert root == "package"
    pkg = json.load(open(tmp_path / "x" / "package" / "package.json"))
    assert pkg["version"] == "2.0.11"


# --- the command line, under every supported interpreter ---------------------------------------

@pytest.mark.parametrize("label", sorted(INTERPRETERS))
@pytest.mark.parametrize("args, env, words", [
    (["serve"], {}, "invalid role"),
    (["serve", "--role", "hub", "--port", "99999"], {}, "--port"),
    (["serve", "--role", "agent"], {"BACKEND_AI_SETTLE": "soon"}, "BACKEND_AI_SETTLE"),
    (["serve", "--role", "hub", "--bogus"], {}, "unrecognized arguments"),
    (["serve", "--role", "king"], {}, "invalid choice"),
])
def test_bad_settings_stop_the_daemon_with_one_line(label, args, env, words):
    python = interpreter(label)
    import subprocess
    manager = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "backend_ai_manager.py")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("BACKEND_AI_")}
    result = subprocess.run([python, manager] + args, env=dict(clean, **env),
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and words in result.stderr, result.stderr


# --- recovery of the install dir after an interrupted link exchange ------------------------------

def test_recover_repairs_every_interrupted_link_exchange(tmp_path):
    install, state = tmp_path / "install", tmp_path / "state"
    releases = bam.Releases(str(install), str(state))
    releases.prepare()
    link = os.path.join(str(state), "current", "x")
    # (a) two-rename fallback died between its renames: `dist` is missing
    (install / ".dist.bam-old").mkdir()
    (install / ".dist.bam-old" / "app.js").write_text("old")
    os.symlink(os.path.join(str(state), "current", "dist"), install / ".dist.bam-new")
    # (b) died before the exchange: the real file is in place, a prepared link beside it
    (install / "package.json").write_text("{}")
    os.symlink(link, install / ".package.json.bam-new")
    # (c) died after RENAME_EXCHANGE: the link is in place, the displaced folder beside it
    os.symlink(os.path.join(str(state), "current", "node_modules"), install / "node_modules")
    (install / ".node_modules.bam-new").mkdir()
    (install / "config.json").write_text("mine")
    releases.recover()
    assert sorted(os.listdir(install)) == ["config.json", "dist", "node_modules", "package.json"]
    assert (install / "dist" / "app.js").read_text() == "old" and not os.path.islink(install / "dist")
    assert (install / "package.json").read_text() == "{}"
    assert os.path.islink(install / "node_modules")


def test_link_entries_exchanges_real_entries_atomically(tmp_path, monkeypatch):
    install, state = tmp_path / "install", tmp_path / "state"
    releases = bam.Releases(str(install), str(state))
    releases.prepare()
    (install / "dist").mkdir()
    (install / "dist" / "a.js").write_text("live")
    tree = tmp_path / "tree"
    (tree / "dist").mkdir(parents=True)
    (tree / "dist" / "a.js").write_text("live")
    rid = releases.add(str(tree), "1.0.0")
    releases.switch(rid)
    exchanged = []
    real = bam._exchange

    def exchange(a, b):
        exchanged.append((os.path.basename(b), real(a, b)))
        return exchanged[-1][1]
    monkeypatch.setattr(bam, "_exchange", exchange)
    releases.link_entries(["dist"])
    # One RENAME_EXCHANGE of the real folder and its link: `dist` was never missing.
    assert exchanged == [("dist", True)]
    assert releases.is_ours("dist") and (install / "dist" / "a.js").read_text() == "live"
    assert sorted(os.listdir(install)) == ["dist"]


@pytest.mark.parametrize("version, kept_as", [("1.4.2", "1.4.2"), ("../../x", "unknown"),
                                               (7, "unknown")])
def test_keep_live_install_keeps_a_live_install_of_any_version(tmp_path, version, kept_as):
    install, state = tmp_path / "install", tmp_path / "state"
    releases = bam.Releases(str(install), str(state))
    releases.prepare()
    (install / "dist").mkdir()
    (install / "dist" / "a.js").write_text("live")
    (install / "package.json").write_text(json.dumps({"version": version}))
    rid = releases.keep_live_install(["dist", "package.json"])
    assert releases.version_of(rid) == kept_as
    assert (tmp_path / "state" / "releases" / rid / "dist" / "a.js").read_text() == "live"


# --- shared systemctl show ----------------------------------------------------------------------

class CountingSystemd(bam.Systemd):
    def __init__(self):
        super().__init__("x.service")
        self.calls = 0
        import threading
        self.gate = threading.Event()

    def _show(self):
        self.calls += 1
        number = self.calls
        self.gate.wait(5)
        return {"ActiveState": "active", "call": str(number)}


def test_concurrent_status_calls_share_one_systemctl_call():
    import threading
    sd = CountingSystemd()
    results = []
    threads = [threading.Thread(target=lambda: results.append(sd.show())) for _ in range(20)]
    for t in threads:
        t.start()
    import time
    time.sleep(0.2)
    sd.gate.set()
    for t in threads:
        t.join()
    assert sd.calls == 1 and len(results) == 20 and all(r["call"] == "1" for r in results)


def test_cached_status_is_bounded_in_age_and_never_crosses_an_action(monkeypatch):
    import threading
    import time
    ran = []
    monkeypatch.setattr(bam, "run_command", lambda argv, timeout: (
        ran.append(argv[1:]), bam.CommandResult(argv, 0, "", "", False))[1])
    sd = CountingSystemd()
    sd.gate.set()
    assert sd.show(max_age=5)["call"] == "1"
    assert sd.show(max_age=5)["call"] == "1"     # reused: younger than max_age
    assert sd.show()["call"] == "2"              # max_age 0: always a fresh call
    time.sleep(0.06)
    assert sd.show(max_age=0.05)["call"] == "3"  # too old
    sd.control("restart")
    assert ran == [["reset-failed", "x.service"], ["restart", "x.service"]]
    assert sd.show(max_age=5)["call"] == "4"     # nothing from before the restart
    # A call in flight when an action is made is not joined by a caller after the action.
    sd.gate.clear()
    before = []
    early = threading.Thread(target=lambda: before.append(sd.show()))
    early.start()
    while sd.calls < 5:
        time.sleep(0.001)
    sd.control("stop")
    after = []
    late = threading.Thread(target=lambda: after.append(sd.show(max_age=5)))
    late.start()
    while sd.calls < 6 and late.is_alive():
        time.sleep(0.001)
    sd.gate.set()
    early.join(5)
    late.join(5)
    assert before[0]["call"] == "5" and after[0]["call"] == "6"


# --- request framing ----------------------------------------------------------------------------

@pytest.mark.parametrize("raw, expected, status", [
    (b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", "head", None),
    (b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\n", None, None),
    (b"POST /update HTTP/1.1\r\nContent-Length: 5\r\n\r\nab", "wait head+5", None),
    (b"POST /update HTTP/1.1\r\nContent-Length: 5\r\n\r\nabcdeGET /", "head+5", None),
    (b"POST /update HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", "head", 400),
    (b"POST /u HTTP/1.1\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n", "head", 400),
    (b"POST /u HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx", "head", 400),
    (b"POST /u HTTP/1.1\r\nContent-Length: +1\r\n\r\nx", "head", 400),
    (b"POST /u HTTP/1.1\r\nContent-Length: 99999\r\n\r\n", "head", 413),
    (b"POST /u HTTP/1.1\r\nX-A: a\rContent-Length: 3\r\n\r\nabc", "head", 400),
    (b"POST /u HTTP/1.1\r\nNoColon\r\nContent-Length: 3\r\n\r\nabc", "head", 400),
    (b"GET / HTTP/1.1\n\n", "head", None),
    (b"GET / HTTP/1.1\nHost: 127.0.0.1\n\r\n", "head", None),          # LF lines, CRLF end
    (b"GET / HTTP/1.1\n\nGET /v HTTP/1.1\r\n\r\n", "head", None),  # two pipelined
    (b"POST /stop HTTP/1.1\r\nX-A: a\r\n Transfer-Encoding: chunked\r\n\r\n", "head", 400),
])
def test_request_framing(raw, expected, status):
    """A request is its head (up to the first empty line) plus exactly the Content-Length the
    parser accepted; a head the parser refuses, or a body that cannot be framed safely, takes
    only the head, is answered with an error and closes the connection."""
    head = bam.HEAD_END.search(raw)
    framed = bam.read_request(bytearray(raw), "127.0.0.1")
    if expected is None:
        assert framed is None
        return
    length, request, error = framed
    assert length == head.end() + int(expected.partition("+")[2] or 0)
    if expected.startswith("wait"):  # the head is whole: wait for `length` bytes
        assert request is None and error is None
    elif status is None:
        assert error is None and request.body == raw[head.end():length]
    else:
        assert bam.error_answer(error)[0] == status and request.close


def test_an_endless_head_is_refused():
    length, request, error = bam.read_request(bytearray(b"GET /" + b"a" * 70000), "x")
    assert length == 70005 and error.status == 431 and request.close


# --- damaged archives and resource limits ----------------------------------------------------

def test_a_tar_cut_short_or_damaged_after_the_first_member_is_refused(tmp_path):
    whole = tar_stream([f("package.json", b"{}"), f("dist/a.js", b"a" * 700),
                        f("dist/b.js", b"b")]).getvalue()
    second = whole.index(b"dist/a.js") // 512 * 512  # the header of the second member
    damaged = bytearray(whole)
    damaged[second + 100] ^= 0xFF  # inside the mode field: the header checksum fails
    for i, data in enumerate((whole[:second], bytes(damaged), whole[:second] + b"junk" * 128)):
        sub = tmp_path / str(i)
        sub.mkdir()
        with pytest.raises(bam.ReleaseError, match="damaged or cut short"):
            bam.Extractor(str(sub / "out"), 1 << 20, 100).extract(io.BytesIO(data))


def test_extended_headers_are_bounded(tmp_path):
    members = [(dict(name="x", pax_headers={"comment": "c" * (2 << 20)}), b"x")]
    with pytest.raises(bam.ReleaseError, match="extended header"):
        extract(tmp_path, members)


def test_folders_count_as_members_and_depth_is_bounded(tmp_path):
    with pytest.raises(bam.ReleaseError, match="more than 10 members"):
        extract(tmp_path, [f("a/b/c/d/e/f/g/h/i/j/k/file")], max_members=10)
    with pytest.raises(bam.ReleaseError, match="64 folders deep"):
        bam.member_path("a/" * 65 + "f")


def test_an_archive_of_dot_extracts_and_dotdot_is_still_refused(tmp_path):
    dest, root, _ = extract(tmp_path, [d("./"), f("./package.json", b"{}"), d("./dist"),
                                       f("./dist/a.js")])
    assert root == "" and os.path.isfile(f"{dest}/dist/a.js")
    (tmp_path / "x").mkdir()
    with pytest.raises(bam.ReleaseError, match="'..'"):
        extract(tmp_path / "x", [d("..")])


@pytest.mark.parametrize("answer, expected", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabcdef", b"abc"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n"
     b"0\r\n\r\n", b"abcde"),
    (b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the close", b"until the close"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", "10 bytes|7 bytes short"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\nabc", "inside a chunk"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcXY2\r\nde\r\n",
     "malformed chunked"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "malformed chunked"),
    (b"SSH-2.0-OpenSSH\r\n\r\n", "malformed answer"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n", "without an answer"),
])
def test_http_client_reads_exactly_and_refuses_a_cut_short_answer(answer, expected):
    """The manager's own HTTP client (the NAS, the health URL): a body ends at Content-Length or
    the last chunk; one that ends early is an error, never a short success."""
    ours, theirs = socket.socketpair()
    with theirs:
        theirs.sendall(answer)
    try:
        if isinstance(expected, bytes):
            assert bam.HttpResponse(ours, b"").read() == expected
        else:
            with pytest.raises(bam.HttpClientError, match=expected):
                bam.HttpResponse(ours, b"").read()
    finally:
        ours.close()


class Trickler:
    """A server on loopback that sends `answer` one byte every `pause` seconds to each client."""

    def __init__(self, answer, pause=0.2):
        self.answer, self.pause = answer, pause
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/health"
        self.done = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while not self.done.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._trickle, args=(conn,), daemon=True).start()

    def _trickle(self, conn):
        with conn:
            for i in range(len(self.answer)):
                if self.done.wait(self.pause):
                    return
                try:
                    conn.sendall(self.answer[i:i + 1])
                except OSError:
                    return

    def close(self):
        self.done.set()
        self.sock.close()


@pytest.mark.parametrize("call", ["health_check", "open_url", "check_url"])
def test_a_trickling_server_cannot_hold_a_call_past_its_deadline(call):
    """Each read waits less than the per-read timeout (1 s), yet the whole answer would take
    about 10 s: the call ends at its deadline (1.5 s) all the same."""
    server = Trickler(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nX-Pad: " + b"p" * 20 + b"\r\n\r\n")
    started = time.monotonic()
    try:
        if call == "health_check":
            with pytest.raises(bam.HttpClientError, match="timed out"):
                bam.health_check(server.url, timeout=1, deadline=started + 1.5)
        elif call == "open_url":
            with pytest.raises(bam.ReleaseError, match="timed out"):
                bam.open_url(server.url, 1, deadline=started + 1.5)
        else:  # the update's health gate: unhealthy once its time is up, not 10 s later
            updater = bam.Updater.__new__(bam.Updater)
            with pytest.raises(bam.Unhealthy, match="did not answer 2xx within 1.5 s"):
                updater._check_url(server.url, 1.5)
        took = time.monotonic() - started
        assert 1.4 < took < 3.0, took
    finally:
        server.close()


def full_listener(address):
    """A listener whose accept queue is full: a new connection to it waits (its SYN dropped)."""
    listener = socket.socket()
    listener.bind((address, 0))
    listener.listen(0)
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        try:
            filler.connect(listener.getsockname())
        except BlockingIOError:
            pass
        fillers.append(filler)
    time.sleep(0.1)
    return listener, fillers


def test_the_deadline_covers_every_address_and_the_tls_handshake(monkeypatch):
    """No step of the client waits past the deadline: two addresses of one name that both
    hang do not get the time twice, and a TLS handshake after a slow connect gets only what
    is left."""
    hanging = [full_listener("127.0.0.1"), full_listener("127.0.0.2")]
    ports = [listener.getsockname()[1] for listener, _ in hanging]
    real = socket.getaddrinfo

    def two_addresses(host, port, *args, **kwargs):
        if host in (b"two.test", "two.test"):
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", ports[0])),
                    (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.2", ports[1]))]
        return real(host, port, *args, **kwargs)

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepts (by the kernel), never answers: a TLS handshake waits
    try:
        monkeypatch.setattr(socket, "getaddrinfo", two_addresses)
        started = time.monotonic()
        with pytest.raises(bam.HttpClientError, match="timed out"):
            bam.health_check("http://two.test/", timeout=5, deadline=started + 1.0)
        assert time.monotonic() - started < 1.4

        connect = bam._connect

        def slow_connect(*args):
            time.sleep(0.7)
            return connect(*args)

        monkeypatch.setattr(bam, "_connect", slow_connect)
        started = time.monotonic()
        with pytest.raises(bam.HttpClientError, match="timed out"):
            bam.health_check(f"https://127.0.0.1:{silent.getsockname()[1]}/", timeout=5,
                             deadline=started + 1.0)
        assert time.monotonic() - started < 1.4
    finally:
        silent.close()
        for listener, fillers in hanging:
            listener.close()
            for filler in fillers:
                filler.close()


def test_the_client_turns_a_bad_host_and_a_reset_into_its_own_error():
    """Callers catch HttpClientError (a health gate rolls back on it); a redirect to a name the
    idna codec refuses, or a reset in the middle of a body, must not escape as anything else."""
    with pytest.raises(bam.HttpClientError, match="not a valid host name"):
        bam.http_get("http://\u00e9..x/", timeout=1)
    ours, theirs = socket.socketpair()
    theirs.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    ours.sendall(b"x")  # unread by the peer: its close resets the connection
    theirs.close()
    try:
        with pytest.raises(bam.HttpClientError, match="connection failed"):
            bam.HttpResponse(ours, b"").read()
    finally:
        ours.close()


# --- the manager's own update: the pure decisions ------------------------------------------------

def test_manager_versions_compare_as_dotted_numbers_and_are_read_not_run():
    key = bam.version_key
    assert key("0.10.0") > key("0.9.1") > key("0.9") and key("1.2.3-rc1") == key("1.2.3")
    assert key("0.1.0.1") > key("0.1.0")
    assert bam.manager_version(b'#!/usr/bin/python3\n__version__ = "1.4.0"\nimport os\n') == "1.4.0"
    for text in (b'__version__ = "../x"\n', b'x = 1\n', b'  __version__ = "1.0"\n'):
        assert bam.manager_version(text) is None, text


def manager_update(tmp_path, **settings):
    values = {"role": "agent", "state_dir": str(tmp_path / "state"),
              "install_dir": str(tmp_path / "install")}
    values.update(settings)
    settings = bam.resolve_settings(values, {})
    return bam.ManagerUpdate(settings, bam.Releases(settings.install_dir, settings.state_dir))


def kept(update, version):
    update.keep(version, f'__version__ = "{version}"\n'.encode())


def test_start_point_runs_the_newest_good_of_itself_and_the_kept_one(tmp_path):
    update = manager_update(tmp_path)
    assert update.start_point(None) is None  # a first start: this file, now the good one
    assert update.record["good"] == bam.__version__
    newer, older = f"{bam.__version__}.5", "0.0.1"
    kept(update, newer)
    update.point(newer)
    assert update.start_point(None) == update.file(newer)
    assert update.start_point("start") is None  # handed over already: no second hand-over
    kept(update, older)
    update.point(older)
    assert update.start_point(None) is None  # never a downgrade
    update.point(newer)
    update.save(failed={newer: "it died"})
    assert update.start_point(None) is None  # a failed version is not run by itself
    assert manager_update(tmp_path, manager_updates="off").start_point(None) is None


def test_a_trial_that_did_not_end_fails_its_version_and_the_good_one_returns(tmp_path):
    update = manager_update(tmp_path)
    good, trial = f"{bam.__version__}.1", f"{bam.__version__}.2"
    for version in (good, trial):
        kept(update, version)
    update.point(trial)
    update.save(good=good, trial={"version": trial, "from": good, "phase": "trial",
                                  "serving": time.time() - 3, "trial": 30},
                self_update={"version": trial, "state": "trial"})
    assert update.start_point(None) == update.file(good)
    record = json.loads((tmp_path / "state" / "manager" / "manager.json").read_text())
    assert record["trial"] is None and record["self_update"]["state"] == "reverted"
    assert record["failed"][trial].startswith("stopped during its 30 s trial (it began serving 3")
    assert os.readlink(update.current) == good
    # Exec'd, but it never served: failed too, with its own reason.
    update.save(trial={"version": f"{trial}.1", "from": good, "phase": "executing"})
    update.start_point(None)
    assert "did not start serving" in update.record["failed"][f"{trial}.1"]
    # Stopped before the exec: it never ran, so it is not failed, and is tried again.
    update.save(trial={"version": f"{trial}.2", "from": good, "phase": "handing over"})
    assert update.start_point(None) == update.file(good)
    assert f"{trial}.2" not in update.record["failed"] and update.record["trial"] is None
    assert update.record["self_update"]["state"] == "interrupted"


def test_self_test_passes_the_settings_and_checks_the_version(tmp_path):
    update = manager_update(tmp_path, log_requests="yes", port="3999")
    assert update.self_test(bam.__file__, bam.__version__) is None
    assert update.self_test(bam.__file__, "9.9.9") == \
        f"it says it is {bam.__version__}, not 9.9.9"
    broken = tmp_path / "broken.py"
    broken.write_text("def broken(:\n")
    assert update.self_test(str(broken), "1.0").startswith("exit status 1: SyntaxError")
    with_bad_setting = manager_update(tmp_path, port="3999")
    with_bad_setting.settings.sources["port"] = ("99999", "flag")  # as a newer file might refuse
    assert "exit status 2" in with_bad_setting.self_test(bam.__file__, bam.__version__)
    assert not os.path.exists(tmp_path / "state" / "manager")  # nothing written


def test_pending_is_a_newer_manager_the_current_release_carries_unless_off_or_failed(tmp_path):
    newer = f"{bam.__version__}.3"
    release = tmp_path / "state" / "releases" / "000001-2.0.0" / "dist" / "manager"
    release.mkdir(parents=True)
    data = f'__version__ = "{newer}"\n'.encode()
    (release / "backend_ai_manager.py").write_bytes(data)
    os.symlink("releases/000001-2.0.0", tmp_path / "state" / "current")
    assert manager_update(tmp_path).pending() == (newer, data)
    assert manager_update(tmp_path, manager_updates="off").pending() == (None, None)
    failed = manager_update(tmp_path)
    failed.record["failed"][newer] = "it died"
    assert failed.pending() == (None, None)
    (release / "backend_ai_manager.py").write_bytes(b'__version__ = "0.0.9"\n')
    assert manager_update(tmp_path).pending() == (None, None)  # older: never a downgrade


def test_a_clean_stop_during_a_trial_undoes_it_without_failing_the_version(tmp_path):
    update = manager_update(tmp_path)
    good, trial = "0.0.1", bam.__version__  # this process is the one on trial
    kept(update, good)
    kept(update, trial)
    update.point(trial)
    update.save(good=good, trial={"version": trial, "from": good, "phase": "trial"},
                self_update={"version": trial, "state": "trial"})
    update.stopped()
    assert update.record["trial"] is None and update.record["failed"] == {}
    assert update.record["self_update"]["state"] == "interrupted"
    assert os.readlink(update.current) == good
    update.stopped()  # nothing on trial: nothing changes
    assert update.record["self_update"]["state"] == "interrupted"


def test_a_signature_file_that_is_not_an_ssh_signature_is_refused_before_ssh_keygen(tmp_path):
    armored = b"-----BEGIN SSH SIGNATURE-----\n!!\n-----END SSH SIGNATURE-----"
    for junk in (b"", b"garbage", armored):
        with pytest.raises(bam.ReleaseError, match="is not an SSH signature"):
            bam.check_signature(b"0" * 64, junk, "/nonexistent", str(tmp_path))
    assert bam.signature_key(b"-----BEGIN SSH SIGNATURE-----\nU1NIU0lH\n"
                             b"-----END SSH SIGNATURE-----") is None  # "SSHSIG", no key
