"""A real Node hub for the tests, the demo and the benchmarks: build it, package releases of it, and
write the systemd unit that runs it.

The hub is tests/fixtures/node-hub: an express app in TypeScript (src/index.ts), compiled by tsc to
dist/index.js, with a committed package-lock.json. See that file for what it serves.

    prepared = prepare(work)                        # npm ci + tsc, once per process and `work`
    build(prepared, "2.0.11", os.path.join(work, "build-2.0.11"))
    pack(os.path.join(work, "build-2.0.11"), os.path.join(nas_root, "2.0.11", "hub-2.0.11.tar.gz"))
    unit_text("/opt/hub", 3000, ["DynamicUser=yes"])

`work` must be a folder the callers can see: not under /tmp when the release goes into the systemd
sandbox (tests/sandbox.py hides /tmp behind a fresh tmpfs).

Standard library only, Python 3.9+. Imported with `sys.path.insert(0, tests_dir)`.
"""

import json
import os
import shutil
import signal
import stat
import subprocess
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURE = os.path.join(HERE, "fixtures", "node-hub")

NODE = "/usr/bin/node"
NPM = shutil.which("npm") or "/usr/bin/npm"
TAR = "/usr/bin/tar"
MIN_NODE_MAJOR = 18  # express 4.22 and typescript 5.9 need no more; the machines have node 20

NPM_CI_TIMEOUT = 600  # seconds; a cold npm cache fetches 72 packages (~28 MB unpacked)
TSC_TIMEOUT = 120

# The top-level entries of a release, as a build script stages them in build/ before
# `tar czf hub-V.tar.gz -C build .`: what `node dist/index.js` needs at run time, and the lock file
# (which records what node_modules holds). node_modules is `npm ci`'s whole tree, devDependencies
# (typescript) included, so the release carries node_modules/.bin/ and its relative links (tsc,
# tsserver, mime) as real releases do. Not shipped: src/ and tsconfig.json (build inputs), and
# config.json (the operator's, kept in the install dir).
RELEASE_ENTRIES = ("package.json", "package-lock.json", "dist", "node_modules")

# What prepare() measured, by prepared folder: {"npm_ci": seconds, "tsc": seconds}.
TIMINGS = {}

_prepared = {}  # realpath(work) -> prepared folder, or the RuntimeError that prepare() raised
_lock = threading.Lock()


def unavailable_reason():
    """None if node and npm can build and run the hub, else a one-line reason (callers skip with
    it, and fail under CI=true)."""
    if not os.access(NODE, os.X_OK):
        return f"{NODE} is not installed"
    if not os.access(NPM, os.X_OK):
        return "npm is not installed"
    try:
        out = subprocess.run([NODE, "--version"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, universal_newlines=True, timeout=30).stdout
        major = int(out.strip().lstrip("v").split(".")[0])
    except (OSError, ValueError, subprocess.TimeoutExpired) as e:
        return f"{NODE} --version failed: {e}"
    if major < MIN_NODE_MAJOR:
        return f"{NODE} is {out.strip()}, the hub needs node >= {MIN_NODE_MAJOR}"
    return None


def _run(argv, cwd, timeout, what):
    """Run argv in its own process group; return its output (stdout and stderr). On a non-zero exit
    or a timeout (then the whole group is killed) raise RuntimeError with the output."""
    proc = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, universal_newlines=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        out, _ = proc.communicate()
        raise RuntimeError(f"{what} did not finish within {timeout} s in {cwd}:\n{_cut(out)}") \
            from None
    except BaseException:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        raise
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed (exit code {proc.returncode}) in {cwd}:\n{_cut(out)}")
    return out


def _cut(out, keep=3000):
    """npm's output, its middle left out when long (its usage text, progress lines)."""
    if len(out) <= 2 * keep:
        return out
    return f"{out[:keep]}\n[... {len(out) - 2 * keep} characters left out ...]\n{out[-keep:]}"


def prepare(work, timeout=NPM_CI_TIMEOUT):
    """Return the path of a ready build folder, `work`/node-hub: the fixture copied there (without
    any node_modules/ or dist/ a developer left in it), `npm ci --no-audit --no-fund` run in it,
    then the TypeScript build (`node_modules/.bin/tsc`, i.e. `npm run build`). Done once per
    process and `work`: later calls return the same folder, or raise the same error again without
    retrying. How long npm ci and tsc took is in TIMINGS[path]. Raises RuntimeError with npm's
    (or tsc's) output if a step fails or npm ci exceeds `timeout` seconds."""
    key = os.path.realpath(work)
    with _lock:
        done = _prepared.get(key)
        if isinstance(done, Exception):
            raise RuntimeError(str(done))
        if done:
            return done
        try:
            path = _prepare(key, timeout)
        except RuntimeError as e:
            _prepared[key] = e
            raise
        _prepared[key] = path
        return path


def _prepare(work, timeout):
    reason = unavailable_reason()
    if reason:
        raise RuntimeError(f"cannot build the node hub: {reason}")
    path = os.path.join(work, "node-hub")
    shutil.rmtree(path, ignore_errors=True)  # from an earlier process: npm ci starts clean anyway
    os.makedirs(work, exist_ok=True)
    shutil.copytree(FIXTURE, path, ignore=shutil.ignore_patterns("node_modules", "dist"))
    t0 = time.monotonic()
    _run([NPM, "ci", "--no-audit", "--no-fund"], path, timeout, "npm ci")
    t1 = time.monotonic()
    _run([NODE, os.path.join(path, "node_modules", ".bin", "tsc"), "-p", "tsconfig.json"], path,
         TSC_TIMEOUT, "tsc (the hub's TypeScript build)")
    t2 = time.monotonic()
    if not os.path.isfile(os.path.join(path, "dist", "index.js")):
        raise RuntimeError(f"tsc wrote no dist/index.js in {path}")
    TIMINGS[path] = {"npm_ci": t1 - t0, "tsc": t2 - t1}
    return path


def _version_of(text, version):
    data = json.loads(text)
    data["version"] = version
    return data


def build(prepared, version, dest, crash=False, extra=None):
    """Stage the release of `version` in the new folder `dest` (it must not exist) from a prepare()d
    folder, as a build script fills build/ before `tar czf hub-V.tar.gz -C build .`: exactly
    RELEASE_ENTRIES, i.e.
      package.json       the fixture's, "version" set to `version`
      package-lock.json  the same, its two "version" fields of the root package set to `version`
      dist/              tsc's output, plus dist/code.txt = "hub code of <version>\\n" (the hub
                         serves it as "code"), plus dist/crash if `crash` (the hub then exits with
                         code 3 at start: a broken release)
      node_modules/      npm ci's tree, symlinks kept as symlinks (node_modules/.bin/*, relative)
    `extra` = {relative path: bytes}: more files written last (parents created, existing files
    replaced), e.g. a big file to make the release larger. Modes are made 0644 for files (0755 if
    executable by the owner) and 0755 for folders, whatever the umask, so the unprivileged or
    dynamic user of the unit can read a release installed by root. Returns `dest`."""
    if os.path.lexists(dest):
        raise FileExistsError(f"{dest} already exists")
    os.makedirs(dest)
    with open(os.path.join(prepared, "package.json")) as f:
        package = _version_of(f.read(), version)
    with open(os.path.join(prepared, "package-lock.json")) as f:
        lock = _version_of(f.read(), version)
    lock.get("packages", {}).get("", {})["version"] = version
    with open(os.path.join(dest, "package.json"), "w") as f:
        f.write(json.dumps(package, indent=2) + "\n")
    with open(os.path.join(dest, "package-lock.json"), "w") as f:
        f.write(json.dumps(lock, indent=2) + "\n")
    shutil.copytree(os.path.join(prepared, "dist"), os.path.join(dest, "dist"), symlinks=True)
    shutil.copytree(os.path.join(prepared, "node_modules"), os.path.join(dest, "node_modules"),
                    symlinks=True)
    with open(os.path.join(dest, "dist", "code.txt"), "w") as f:
        f.write(f"hub code of {version}\n")
    if crash:
        with open(os.path.join(dest, "dist", "crash"), "w") as f:
            f.write("this release exits with code 3 at start\n")
    for rel, content in (extra or {}).items():
        norm = os.path.normpath(rel)
        if os.path.isabs(rel) or norm == "." or norm.split(os.sep)[0] == "..":
            raise ValueError(f"extra file {rel!r} is not a path inside the release")
        path = os.path.join(dest, norm)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(content)
    _normalize_modes(dest)
    return dest


def _normalize_modes(root):
    os.chmod(root, 0o755)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                continue
            if stat.S_ISDIR(st.st_mode) or st.st_mode & stat.S_IXUSR:
                os.chmod(path, 0o755)
            else:
                os.chmod(path, 0o644)


def pack(build_dir, tarball):
    """Write `tarball` as a build script does: `tar czf TARBALL -C BUILD_DIR .` with GNU tar
    (members ./, ./package.json, ...; symlinks stored as symlinks). Parent folders of `tarball`
    are created. Returns `tarball`."""
    parent = os.path.dirname(os.path.abspath(tarball))
    os.makedirs(parent, exist_ok=True)
    _run([TAR, "czf", os.path.abspath(tarball), "-C", build_dir, "."], parent, 600, "tar")
    return tarball


def _check_line_value(value, what):
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError(f"{what} {value!r} has a control character (newline, tab, ...), which a "
                         "unit file cannot hold")


def _working_directory(path):
    """WorkingDirectory='s value: systemd takes the rest of the line (no quotes, no C escapes),
    strips surrounding whitespace, reads a trailing backslash as a line continuation, and resolves
    %-specifiers; so only '%' needs escaping ('%%')."""
    _check_line_value(path, "install dir")
    if not os.path.isabs(path):
        raise ValueError(f"install dir {path!r} is not an absolute path")
    if path != path.rstrip() or path.endswith("\\"):
        raise ValueError(f"install dir {path!r} ends with whitespace or a backslash, which "
                         "WorkingDirectory= cannot hold")
    return path.replace("%", "%%")


def _exec_word(word):
    """One word of ExecStart= in double quotes. systemd resolves %-specifiers in the line, undoes C
    escapes inside the quotes ('\\\\', '\\"'), and at exec expands $VAR / ${VAR}: so '\\' -> '\\\\',
    '"' -> '\\"', '%' -> '%%' and '$' -> '$$'."""
    _check_line_value(word, "ExecStart= argument")
    escaped = word.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + escaped.replace("%", "%%").replace("$", "$$") + '"'


def unit_text(install_dir, port, user_lines=()):
    """The text of the hub's service unit as the tests run it: WorkingDirectory= the install dir
    (where config.json lives), PORT in the environment, `node <install_dir>/dist/index.js`, restarted
    on failure after 1 s. `user_lines` are added to [Service] as given (e.g. "User=hubuser",
    "DynamicUser=yes"). The install dir may hold spaces, quotes, '%' or '$' (checked with systemd
    252 in tests/sandbox.py, under DynamicUser=yes and User=nobody with ReadOnlyPaths=/); a control
    character, trailing whitespace or a backslash (which node cannot load packages from) raises
    ValueError."""
    if "\\" in install_dir:
        # systemd would pass it on intact (see _exec_word), but node then fails to load express:
        # ERR_INVALID_MODULE_SPECIFIER, 'must not include encoded "/" or "\\" characters'.
        raise ValueError(f"install dir {install_dir!r} has a backslash: node cannot load packages "
                         "from such a path")
    install_dir = install_dir.rstrip("/") or "/"
    main = os.path.join(install_dir, "dist", "index.js")
    lines = [
        "[Unit]",
        "Description=proxmox-ai-control hub (node, test fixture)",
        "",
        "[Service]",
        "Type=simple",
        f"WorkingDirectory={_working_directory(install_dir)}",
        f"Environment=PORT={int(port)}",
        f"ExecStart={NODE} {_exec_word(main)}",
        "Restart=on-failure",
        "RestartSec=1",
    ]
    for line in user_lines:
        _check_line_value(line, "unit line")
        lines.append(line)
    return "\n".join(lines) + "\n"
