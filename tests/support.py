"""Real components for the tests and the demo: release tarballs, a NAS on loopback, a demo service.

Imported by tests/conftest.py, tests/demo.py and bench/ with `sys.path.insert(0, tests_dir)`.
Standard library only.
"""

import contextlib
import hashlib
import http.server
import io
import json
import os
import re
import shutil
import socket
import tarfile
import subprocess
import sys
import threading
import time

import trees

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
import backend_ai_manager as bam  # noqa: E402  (its names: the job's states)

MANAGER = os.path.join(REPO, "backend_ai_manager.py")


def _newest(pattern):
    import glob
    found = sorted(glob.glob(os.path.expanduser(pattern)),
                   key=lambda p: [int(x) for x in re.findall(r"\d+", p.split("versions/")[1])])
    return found[-1] if found else os.path.expanduser(pattern)


# The interpreters every end-to-end and command-line test runs the manager under: Debian's own
# python3 (3.11.2, tarfile without extraction filters), the oldest supported and the newest
# (pyenv). The one list; tests/conftest.py's interpreter(label) skips a missing one (fails
# under CI=true).
INTERPRETERS = {
    "debian-3.11.2": "/usr/bin/python3",
    "3.9": _newest("~/.pyenv/versions/3.9.*/bin/python3"),
    "3.13": _newest("~/.pyenv/versions/3.13.*/bin/python3"),
}


def http_call(port, method, path, body=None, headers=None, timeout=30, host="127.0.0.1"):
    """One request to a manager on host:`port`, on a fresh connection. `body` is bytes or a
    JSON value. Returns (status, headers, JSON answer, or the raw bytes if not JSON)."""
    import http.client
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    try:
        conn.request(method, path, body=data, headers=headers or {})
        response = conn.getresponse()
        raw = response.read()
        try:
            payload = json.loads(raw) if raw else None
        except ValueError:
            payload = raw
        return response.status, response.headers, payload
    finally:
        conn.close()

# Where the demo, the tests and the benchmarks put their lab (sandbox, NAS, the hosts' install and
# state dirs): not in the checkout, which may be anywhere. The shipped manager units make /home,
# /root and /run/user read-only (ProtectHome=read-only) and give the manager its own /tmp
# (PrivateTmp=), and the sandbox mounts a fresh tmpfs on /tmp, /var/tmp and /run; /var/lib is
# writable under the units' hardening, as it is for an operator's state dir. Every folder on
# the way is 0755, so a service running as its own user can enter it.
LAB_ROOT = os.environ.get("BAM_LAB_DIR") or "/var/lib/backend-ai-manager-lab"
_UNUSABLE = ("/tmp", "/var/tmp", "/run", "/home", "/root")


def lab_dir(name):
    """A new, empty folder LAB_ROOT/NAME-PID for one run; remove it with remove_lab_dir()."""
    root = os.path.realpath(LAB_ROOT)
    if any(root == p or root.startswith(p + "/") for p in _UNUSABLE) or " " in root:
        raise ValueError(f"BAM_LAB_DIR={root} cannot hold the lab: the sandbox or the manager "
                         f"unit's hardening hides or protects {', '.join(_UNUSABLE)}, and "
                         "unit paths must have no space")
    os.makedirs(root, 0o755, exist_ok=True)
    os.chmod(root, 0o755)
    path = os.path.join(root, f"{name}-{os.getpid()}")
    shutil.rmtree(path, ignore_errors=True)  # a run of an earlier process with the same pid
    os.makedirs(path, 0o755)
    return path


def remove_lab_dir(path):
    shutil.rmtree(path, ignore_errors=True)
    try:
        os.rmdir(os.path.dirname(path))  # LAB_ROOT itself, once no other run uses it
    except OSError:
        pass

# The demo service a release carries in dist/server.py: an HTTP server on $PORT (loopback) that
# says which version it runs (read from its own package.json) and the greeting from the install
# dir's config.json, a file the release does not contain and an update must keep.
SERVER_PY = r'''
import http.server, json, os, sys
HERE = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(HERE, "..", "package.json")) as f:
    PACKAGE = json.load(f)
try:
    with open("config.json") as f:   # in WorkingDirectory=, the install dir
        GREETING = json.load(f).get("greeting")
except OSError:
    GREETING = None
if os.environ.get("DEMO_CRASH_AT_START"):
    print("demo service: crashing at start as configured", flush=True)
    sys.exit(3)
BODY = json.dumps({"name": PACKAGE["name"], "version": PACKAGE["version"], "greeting": GREETING,
                   "code": CODE_MARK}).encode()

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(HTTP_STATUS)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)
    def log_message(self, *args):
        pass

port = int(os.environ.get("PORT", "3000"))
server = http.server.HTTPServer(("127.0.0.1", port), Handler)
print(f"{PACKAGE['name']} {PACKAGE['version']} listening on 127.0.0.1:{port}", flush=True)
server.serve_forever()
'''

CRASHING_SERVER_PY = r'''
import sys
print("demo service: this release is broken and exits at start", flush=True)
sys.exit(3)
'''


def server_code(mark, crash=False, http_status=200):
    if crash:
        return CRASHING_SERVER_PY
    return SERVER_PY.replace("CODE_MARK", repr(mark)).replace("HTTP_STATUS", str(http_status))


def release_files(version, name="@proxmox-ai-control/hub", crash=False, extra=None,
                  http_status=200):
    """The files of a demo release: {relative path: bytes or ('symlink', target)}."""
    files = {
        "package.json": json.dumps({"name": name, "version": version,
                                    "main": "dist/server.py"}, indent=2).encode() + b"\n",
        "dist/server.py": server_code(f"server code of {version}", crash, http_status).encode(),
        "dist/api/routes.js": f"// routes of {version}\n".encode(),
        "node_modules/typescript/package.json": b'{"name": "typescript", "version": "5.4.0"}\n',
        "node_modules/typescript/bin/tsc": b"#!/usr/bin/env node\nconsole.log('tsc')\n",
        "node_modules/.bin/tsc": ("symlink", "../typescript/bin/tsc"),
        "package-lock.json": b"{}\n",
    }
    files.update(extra or {})
    return files


def release_members(files, wrap=None):
    """The members of a release tarball holding `files` ({name: bytes | ('symlink', target)}),
    folders first, for tar_bytes(); `wrap` puts everything under one folder (as `npm pack`
    writes 'package/')."""
    members, dirs, now = [], set(), int(time.time())
    for name in sorted(files):
        full = f"{wrap}/{name}" if wrap else name
        parts = full.split("/")
        for i in range(1, len(parts)):
            folder = "/".join(parts[:i])
            if folder not in dirs:
                dirs.add(folder)
                members.append((dict(name=folder, type=tarfile.DIRTYPE, mode=0o755, mtime=now),
                                None))
        content = files[name]
        if isinstance(content, tuple) and content[0] == "symlink":
            members.append((dict(name=full, type=tarfile.SYMTYPE, linkname=content[1],
                                 mtime=now), None))
        else:
            executable = name.endswith("/tsc") or name.endswith(".sh")
            members.append((dict(name=full, mode=0o755 if executable else 0o644, mtime=now),
                            content))
    return members


def tar_bytes(members, gzip_level=None, format=tarfile.PAX_FORMAT):
    """The one tar builder of the tests: `members` is a list of (TarInfo fields with 'name',
    data bytes or None), written in that order, hostile ones included as given. Gzipped when
    gzip_level is set."""
    buf = io.BytesIO()
    options = {"compresslevel": gzip_level} if gzip_level is not None else {}
    with tarfile.open(fileobj=buf, mode="w:gz" if options else "w", format=format,
                      **options) as tar:
        for fields, data in members:
            fields = dict(fields)
            info = tarfile.TarInfo(fields.pop("name"))
            for key, value in fields.items():
                setattr(info, key, value)
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def make_tarball(path, files, wrap=None, level=9):
    """Write a release .tar.gz holding `files` to `path` (a file name or a binary file)."""
    data = tar_bytes(release_members(files, wrap), gzip_level=level)
    if isinstance(path, str):
        with open(path, "wb") as f:
            f.write(data)
    else:
        path.write(data)
    return path


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def install_tree(install_dir, files):
    """Lay out a release directly in an install dir, as an operator did before the manager."""
    for name, content in files.items():
        path = os.path.join(install_dir, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if isinstance(content, tuple):
            os.symlink(content[1], path)
        else:
            with open(path, "wb") as f:
                f.write(content)
            if name.endswith("/tsc"):
                os.chmod(path, 0o755)


def tree_digest(root):
    """A digest of the files an install serves: every regular file reached from `root` (through
    links too) by relative name and content. Directories and the kind of link are left out, so a
    hand-laid install and the same release served through the manager's links are equal."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            if os.path.isfile(path):
                h.update(os.path.relpath(path, root).encode() + b"\0")
                with open(path, "rb") as f:
                    h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Nas:
    """A real HTTP file server on 127.0.0.1 serving `root` like the fleet's NAS
    (/api/raw/<version>/<file>), with per-path faults for tests:
    'hang' (never answers), 'truncate' (sends half the body, then closes), 'status:NNN',
    'throttle:N' (N bytes a second), and the others below."""

    def __init__(self, root):
        self.root = root
        self.faults = {}
        self.requests = []
        self.authorizations = []  # each request's Authorization header (None: none)
        nas = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                nas.requests.append(self.path)
                nas.authorizations.append(self.headers.get("Authorization"))
                fault = nas.faults.get(self.path, "")
                if fault == "hang":
                    time.sleep(3600)
                    return
                if fault.startswith("status:"):
                    return self._plain(int(fault[7:]), b"fault injected\n")
                prefix = "/api/raw/"
                rel = self.path[len(prefix):] if self.path.startswith(prefix) else None
                path = os.path.join(nas.root, rel) if rel and ".." not in rel else None
                if not path or not os.path.isfile(path):
                    return self._plain(404, b"not found\n")
                size = os.path.getsize(path)
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(size))
                self.end_headers()
                limit = size // 2 if fault == "truncate" else size
                if fault == "stall":  # the first 64 KiB, then nothing for 60 s
                    with open(path, "rb") as f:
                        self.wfile.write(f.read(65536))
                        self.wfile.flush()
                    time.sleep(60)
                    self.close_connection = True
                    return
                if fault.startswith("throttle:"):  # N bytes a second, in twentieths
                    step = max(1, int(fault[9:]) // 20)
                    with open(path, "rb") as f:
                        for block in iter(lambda: f.read(step), b""):
                            self.wfile.write(block)
                            self.wfile.flush()
                            time.sleep(0.05)
                    return
                if fault == "trickle":  # one byte every 0.2 s, for at most 30 s
                    with open(path, "rb") as f:
                        for _ in range(150):
                            self.wfile.write(f.read(1))
                            self.wfile.flush()
                            time.sleep(0.2)
                    self.close_connection = True
                    return
                with open(path, "rb") as f:
                    sent = 0
                    while sent < limit:
                        block = f.read(min(1 << 20, limit - sent))
                        if not block:
                            break
                        self.wfile.write(block)
                        sent += len(block)
                if fault == "truncate":
                    self.close_connection = True

            def _plain(self, code, body):
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):
                # A manager killed or stopped mid-download drops its connection: not news.
                if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
                    super().handle_error(request, client_address)

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def tarball(self, version, kind="hub"):
        return os.path.join(self.root, version, f"{kind}-{version}.tar.gz")

    def expected_tree(self, version, kind="hub"):
        """GNU tar's extraction of the published tarball (wrapper folder stripped), as a tree
        (tests/trees.py); cached while the tarball is unchanged."""
        path = self.tarball(version, kind)
        st = os.stat(path)
        key = (path, st.st_mtime_ns, st.st_size, st.st_ino)
        cache = self.__dict__.setdefault("_trees", {})
        if key not in cache:
            cache[key] = trees.gnu_tree(path, os.path.join(self.root, ".gnu-tar-scratch"))
        return cache[key]

    def url_template(self, kind="hub"):
        return f"http://127.0.0.1:{self.port}/api/raw/{{version}}/{kind}-{{version}}.tar.gz"

    def path_of(self, version, kind="hub", suffix=""):
        return f"/api/raw/{version}/{kind}-{version}.tar.gz{suffix}"

    def publish(self, version, files, kind="hub", wrap=None, checksum=True, tarball=None,
                level=9):
        """Build (or copy) a release tarball into the NAS; returns its local path."""
        folder = os.path.join(self.root, version)
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"{kind}-{version}.tar.gz")
        if tarball is not None:
            with open(path, "wb") as f:
                f.write(tarball)
        else:
            make_tarball(path, files, wrap=wrap, level=level)
        self._checksum(path, checksum)
        return path

    def publish_node(self, prepared, version, kind="hub", crash=False, wrap=None, extra=None,
                     checksum=True):
        """Build release `version` of the real Node hub (tests/nodehub.py; `prepared` is
        nodehub.prepare()'s folder) and pack it as a build script would: `tar czf
        hub-V.tar.gz -C build .` (or `-C parent package` for a wrapped one). Returns its path."""
        import nodehub
        builds = os.path.join(self.root, ".builds")
        shutil.rmtree(builds, ignore_errors=True)
        build = nodehub.build(prepared, version, os.path.join(builds, wrap or "build"),
                              crash=crash, extra=extra)
        path = self.tarball(version, kind)
        if wrap:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            subprocess.run([trees.TAR, "czf", path, "-C", builds, wrap], check=True)
        else:
            nodehub.pack(build, path)
        shutil.rmtree(builds, ignore_errors=True)
        self._checksum(path, checksum)
        return path

    @staticmethod
    def _checksum(path, checksum):
        sums = path + ".sha256"
        if checksum:
            with open(sums, "w") as f:
                f.write(f"{sha256_of(path)}  {os.path.basename(path)}\n")
        elif os.path.exists(sums):
            os.unlink(sums)

    def start(self):
        self.thread.start()
        return self

    def stop(self):
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def unit_text(name):
    with open(os.path.join(REPO, "systemd", name)) as f:
        return f.read()


def sandboxed(unit):
    """The unit as shipped, plus DefaultDependencies=no: the sandbox shares the host's /etc and
    /var, and a first unit with default dependencies pulls in sysinit.target, whose units
    (tmpfiles, sysctl, sysusers ...) would act on the host's own files (seen: /etc/mtab
    replaced, wtmp boot records)."""
    return unit.replace("[Unit]\n", "[Unit]\nDefaultDependencies=no\n", 1)


class Host:
    """One managed host inside a systemd sandbox: an install dir holding an existing release (laid
    out by hand, as before the manager), the example service unit and the real manager unit from
    systemd/, with the manager run by `python` and configured through its EnvironmentFile."""

    SERVICE = "ai-hub.service"
    MANAGER_UNIT = "ai-hub-manager.service"

    def __init__(self, sandbox, base, nas, python="/usr/bin/python3", settle=1, env=None,
                 service_unit_lines=(), node=None, service_lines=(), role="hub", name=None,
                 address="127.0.0.1", port=None):
        self.sandbox, self.base, self.nas, self.python = sandbox, base, nas, python
        # An agent host (role "agent") runs the shipped ai-agent-manager.service; several hosts
        # in one sandbox need units of their own (name) and, on port 3081, addresses of their
        # own (127.0.1.N: the whole of 127/8 answers on lo).
        self.role, self.address = role, address
        self.kind = "agent" if role == "agent" else "hub"
        if name:
            self.SERVICE = f"ai-{self.kind}-{name}.service"
            self.MANAGER_UNIT = f"ai-{self.kind}-manager-{name}.service"
        self.service_unit_lines = service_unit_lines  # added to the service's [Unit] section
        self.service_lines = service_lines  # added to its [Service] section (User=, ...)
        # The real Node hub (nodehub.prepare()'s folder) or, with None, the small Python
        # stand-in of release_files().
        self.node = node
        self.install_dir = os.path.join(base, "install")
        self.state_dir = os.path.join(base, "state")
        # The manager runs from its own copy, as `make install` puts it in /usr/local/lib: the
        # checkout may be anywhere (a home folder, a path with a space).
        self.manager = os.path.join(base, "bin", "backend_ai_manager.py")
        self.port = port or free_port()
        self.service_port = free_port()
        self.env = {
            "BACKEND_AI_INSTALL_DIR": self.install_dir, "BACKEND_AI_STATE_DIR": self.state_dir,
            "BACKEND_AI_PORT": str(self.port), "BACKEND_AI_NAS_URL": nas.url_template(self.kind),
            "BACKEND_AI_SETTLE": str(settle), "BACKEND_AI_BIND": address,
            "BACKEND_AI_SERVICE": self.SERVICE,
        }
        self.env.update(env or {})

    def install_base(self, version="2.0.10", greeting="hello from config.json"):
        """Install `version` by hand, as an operator did before the manager: GNU tar extracts
        the NAS's tarball into the install dir (published first if the NAS lacks it), next to
        the operator's own config.json."""
        if not os.path.exists(self.nas.tarball(version, self.kind)):
            self.publish(version)
        os.makedirs(self.install_dir)
        trees.gnu_extract_into(self.nas.tarball(version, self.kind), self.install_dir)
        with open(os.path.join(self.install_dir, "config.json"), "w") as f:
            json.dump({"greeting": greeting}, f)

    def view(self):
        """The whole install as the service sees it (install links followed), config included."""
        return trees.installed(self.install_dir, os.listdir(self.install_dir))

    def assert_installed(self, version):
        """What the service sees through the install dir is, byte for byte, GNU tar's extraction
        of the NAS's tarball of `version`: names, types, link targets, contents, execute bits."""
        expected = self.nas.expected_tree(version, self.kind)
        trees.assert_same(expected, trees.installed(self.install_dir, expected),
                          f"{self.install_dir} (expected release {version})")

    def publish(self, version, **kwargs):
        """Publish release `version` of this host's service (Node hub or stand-in) on the NAS."""
        kwargs.setdefault("kind", self.kind)
        if self.node:
            return self.nas.publish_node(self.node, version, **kwargs)
        crash, wrap = kwargs.pop("crash", False), kwargs.pop("wrap", None)
        return self.nas.publish(version, release_files(version, crash=crash,
                                                       extra=kwargs.pop("extra", None)),
                                wrap=wrap, **kwargs)

    def service_unit(self):
        """systemd/example-ai-hub.service as shipped, for this host's install dir and port."""
        text = unit_text("example-ai-hub.service").replace(
            "/opt/backend-ai/hub", self.install_dir).replace(
            "PORT=3000", f"PORT={self.service_port}")
        if not self.node:
            node = f"ExecStart=/usr/bin/node {self.install_dir}/dist/index.js"
            assert node in text, text
            text = text.replace(node, f"ExecStart=/usr/bin/python3 -u {self.install_dir}/dist/server.py")
        text = text.replace("[Unit]\n", "[Unit]\n" + "".join(
            f"{line}\n" for line in self.service_unit_lines), 1)
        return text.replace("[Service]\n", "[Service]\n" + "".join(
            f"{line}\n" for line in self.service_lines), 1)

    def install_manager(self):
        os.makedirs(os.path.dirname(self.manager), 0o755, exist_ok=True)
        shutil.copyfile(MANAGER, self.manager)
        os.chmod(self.manager, 0o755)

    def write_units(self):
        self.install_manager()
        service = self.service_unit()
        manager = []
        for line in unit_text(f"ai-{self.kind}-manager.service").splitlines():
            if line.startswith("ExecStart="):
                line = f"ExecStart={self.python} {self.manager} serve"
            elif line.startswith("EnvironmentFile="):
                line = f"EnvironmentFile={self.base}/manager.env"
            manager.append(line)
        with open(os.path.join(self.base, "manager.env"), "w") as f:
            f.writelines(f"{k}={v}\n" for k, v in self.env.items())
        self.sandbox.add_unit(self.SERVICE, sandboxed(service))
        self.sandbox.add_unit(f"{self.MANAGER_UNIT}.d/hardening.conf", unit_text(
            f"ai-{self.kind}-manager.service.d/hardening.conf"))
        self.sandbox.add_unit(self.MANAGER_UNIT, sandboxed("\n".join(manager) + "\n"))

    def start(self):
        self.write_units()
        for unit in (self.SERVICE, self.MANAGER_UNIT):
            result = self.sandbox.systemctl("start", unit)
            assert result.returncode == 0, result.stderr
        self.wait_manager()
        return self

    def wait_manager(self, timeout=20):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                return self.api("GET", "/status")
            except OSError:
                time.sleep(0.05)
        log = self.sandbox.run(["journalctl", "-u", self.MANAGER_UNIT, "-n", "30", "--no-pager"])
        raise RuntimeError(f"manager did not answer on port {self.port}:\n{log.stdout}")

    def manager_pid(self):
        out = self.sandbox.systemctl("show", self.MANAGER_UNIT, "-p", "MainPID").stdout
        return int(out.strip().split("=")[1])

    def wait_manager_killed(self, pid, timeout=60):
        """After an update was started with a failpoint: True once the manager `pid` has died
        (systemd starts another), False if its job ended without reaching the failpoint."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.manager_pid() != pid:
                return True
            try:
                state = self.api("GET", "/update", timeout=2)[1]["state"]
            except OSError:  # dying right now
                continue
            if state in ("succeeded", "failed", "rolled_back") and self.manager_pid() == pid:
                return False
            time.sleep(0.02)
        raise AssertionError("manager neither died nor finished")

    def service_uid(self):
        """The real uid the service's main process runs as (read inside the sandbox)."""
        status = self.sandbox.run(["cat", f"/proc/{self.main_pid()}/status"]).stdout
        return int([line for line in status.splitlines() if line.startswith("Uid:")][0].split()[1])

    def restart_manager(self, **env):
        """Rewrite the manager's EnvironmentFile with `env` on top of the host's settings
        (a value of None removes a key) and restart the manager unit."""
        settings = dict(self.env)
        for key, value in env.items():
            if value is None:
                settings.pop(key, None)
            else:
                settings[key] = value
        with open(os.path.join(self.base, "manager.env"), "w") as f:
            f.writelines(f"{k}={v}\n" for k, v in settings.items())
        result = self.sandbox.systemctl("restart", self.MANAGER_UNIT)
        assert result.returncode == 0, result.stderr
        return self.wait_manager()

    def serve_by_hand(self, **env):
        """`serve` run by hand inside the sandbox with the unit's settings (and `env` on top),
        as an operator checking a setting would: (exit code, seconds it took, stderr)."""
        environ = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "BACKEND_AI_ROLE": self.role}
        environ.update(self.env)
        environ.update(env)
        started = time.monotonic()
        run = self.sandbox.run([self.python, self.manager, "serve"], env=environ, timeout=60)
        return run.returncode, time.monotonic() - started, run.stderr

    def stop(self):
        for unit in (self.MANAGER_UNIT, self.SERVICE):
            self.sandbox.systemctl("stop", unit)
            self.sandbox.systemctl("reset-failed", unit)

    def api(self, method, path, body=None, headers=None, timeout=30):
        """(status, JSON answer) of one request to this host's manager."""
        status, _, payload = http_call(self.port, method, path, body, headers, timeout,
                                       host=self.address)
        return status, payload

    def wait_update(self, timeout=90):
        """Poll GET /update until the job is no longer working; return the record."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status, record = self.api("GET", "/update")
            if record["state"] not in bam.WORKING_STATES:
                return record
            time.sleep(0.05)  # an answer made by the manager's connection thread: cheap
        raise AssertionError(f"update still running after {timeout} s: {record}")

    def service_info(self, timeout=10):
        """What the running service itself says (its version, code and greeting)."""
        import urllib.request
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.service_port}/",
                                            timeout=5) as r:
                    return json.loads(r.read())
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def is_active(self, unit=None):
        return self.sandbox.is_active(unit or self.SERVICE)

    def main_pid(self):
        out = self.sandbox.systemctl("show", self.SERVICE, "-p", "MainPID").stdout
        return int(out.strip().split("=")[1])


def fleet_hosts(sandbox, base, nas, agents, token, hub_env, agent_name, hub_options=None,
                **options):
    """A hub and its agents as Hosts, each with release 2.0.10 installed by hand and not yet
    started (see started_hosts): one agent per address in `agents` ("127.0.x.y:3081"), named
    agent_name(n) for n = 1, 2, ..., requiring the bearer token in the file `token`; a hub that
    sends it, with `hub_env` and the agent list in the file base/agents (a comment line first).
    `options` go to every Host, `hub_options` to the hub's only. Returns (hub, agents, list)."""
    hosts = []
    for n, agent in enumerate(agents, 1):
        host = Host(sandbox, os.path.join(base, f"agent{n}"), nas, role="agent",
                    name=agent_name(n), address=agent.split(":")[0], port=3081,
                    env={"BACKEND_AI_TOKEN_FILE": token}, **options)
        host.install_base("2.0.10")
        hosts.append(host)
    listed = os.path.join(base, "agents")
    with open(listed, "w") as f:
        f.write("# the fleet\n" + "\n".join(agents) + "\n")
    hub = Host(sandbox, os.path.join(base, "hub"), nas, env=dict(
        hub_env, BACKEND_AI_AGENTS=f"@{listed}", BACKEND_AI_AGENT_TOKEN_FILE=token),
        **dict(options, **(hub_options or {})))
    hub.install_base("2.0.10")
    return hub, hosts, listed


@contextlib.contextmanager
def started_hosts(hosts):
    """Start `hosts` in order; stop the ones started, whatever happens."""
    started = []
    try:
        for host in hosts:
            host.start()
            started.append(host)
        yield
    finally:
        for host in started:
            host.stop()


class Lab:
    """What the demo and the benchmarks run in: a work folder under LAB_ROOT, a booted systemd
    sandbox, a NAS on loopback, and the hosts made with host(). `with Lab("demo") as lab:`
    stops and removes all of it on the way out, also on failure or Ctrl-C."""

    def __init__(self, name, parent=None):
        self.name, self.parent = name, parent
        self.work = None
        self.sandbox = self.nas = None
        self.hosts = []
        self.boot_seconds = None

    def __enter__(self):
        import sandbox as sandbox_mod
        if self.parent:
            self.work = os.path.join(self.parent, f"{self.name}-{os.getpid()}")
            os.makedirs(self.work)
        else:
            self.work = lab_dir(self.name)
        try:
            self.sandbox = sandbox_mod.Sandbox(os.path.join(self.work, "systemd"))
            started = time.monotonic()
            self.sandbox.start()
            self.boot_seconds = time.monotonic() - started
            self.nas = Nas(os.path.join(self.work, "nas")).start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def host(self, folder="host", **kwargs):
        host = Host(self.sandbox, os.path.join(self.work, folder), self.nas, **kwargs)
        self.hosts.append(host)
        return host

    def __exit__(self, *exc):
        for host in self.hosts:
            host.stop()
        if self.nas:
            self.nas.stop()
        if self.sandbox:
            self.sandbox.stop()
        if self.work and not self.parent:
            remove_lab_dir(self.work)
        elif self.work:
            shutil.rmtree(self.work, ignore_errors=True)


# --- the manager in-process, with a stand-in for systemd (fast tests, no root) ---------------------

class FakeSystemd:
    """Records calls; answers like systemctl for a unit that starts and stops. A restart of an
    install whose package.json names a version in `unhealthy` leaves the unit failed."""

    def __init__(self, unit="ai-hub.service", install_dir=None):
        self.unit = unit
        self.install_dir = install_dir
        self.unhealthy = set()
        self.active = True
        self.calls = []
        self.fail = None

    STATUS_MAX_AGE = 0

    def show(self, max_age=0.0, wait=True):
        return {"ActiveState": "active" if self.active else "inactive", "SubState": "running",
                "MainPID": "42" if self.active else "0", "NRestarts": "0", "LoadState": "loaded",
                "ActiveEnterTimestamp": "Fri 2026-11-27 21:00:05 UTC"}

    def status(self, max_age=0.0, wait=True):
        return bam.Systemd.status(self, max_age, wait)

    def control(self, action):
        self.calls.append(action)
        if self.fail:
            raise self.fail
        self.active = action != "stop" and self.installed() not in self.unhealthy

    def installed(self):
        try:
            with open(os.path.join(self.install_dir, "package.json")) as f:
                return json.load(f)["version"]
        except (OSError, ValueError, TypeError):
            return None

    def logs(self, lines, output="short-iso"):
        return "\n".join(f"line {i}" for i in range(lines))


class Running:
    def __init__(self, tmp_path, **overrides):
        install = tmp_path / "install"
        install.mkdir()
        (install / "package.json").write_text(json.dumps(
            {"name": "@proxmox-ai-control/hub", "version": "2.0.10"}))
        values = {"role": "hub", "install_dir": str(install), "state_dir": str(tmp_path / "state"),
                  "settle": "0", "port": "1"}
        values.update(overrides)
        flags = {name: values.get(name) for name, *_ in bam.OPTIONS}
        settings = bam.resolve_settings(flags, {})
        settings = bam.Settings(dict(vars(settings), port=0))
        self.systemd = FakeSystemd(install_dir=str(install))
        releases = bam.Releases(settings.install_dir, settings.state_dir)
        self.updater = bam.Updater(settings, self.systemd, releases)
        self.updater.recover()
        self.rollout = None
        if settings.role == "hub":
            self.rollout = bam.Rollout(settings)
            self.rollout.recover(self.updater.job.state, self.systemd.installed())
        self.server = bam.Server(settings, bam.Api(settings, self.systemd, self.updater,
                                                   self.rollout))
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def request(self, method, path, body=None, headers=None):
        """(status, JSON answer, headers) of one request."""
        status, headers, payload = http_call(self.port, method, path, body, headers, timeout=10)
        return status, payload, headers

    def wait_update(self, timeout):
        """Wait (at most `timeout` s) until the update job is over; return its record."""
        deadline = time.monotonic() + timeout
        while self.updater.busy() and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.updater.view()

    def raw(self, data, read_until_close=True):
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
            sock.sendall(data)
            chunks = []
            while True:
                try:
                    chunk = sock.recv(65536)
                except socket.timeout:
                    break
                if not chunk:
                    break
                chunks.append(chunk)
            return b"".join(chunks)

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
