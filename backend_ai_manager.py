#!/usr/bin/env python3
"""backend-ai-manager: start, stop, inspect, update and roll back one systemd service over HTTP.

One file, standard library only, Python 3.9+. Runs on every host of the fleet on port 3081 and
controls exactly one local unit (the hub or an agent); README.md describes the API. It reads
top-down, each section using only what the sections above it define:

    core       errors, test failpoints, file helpers, logging, running a command, shared calls
    settings   every option declared once, resolved and validated before the port is bound
    systemd    systemctl and journalctl for the one unit
    wire       HTTP/1.1 both ways: the head parser and framing, the one client, agent fan-out
    archive    the strict tar reader and extractor (download, gunzip, unpack), the tar writer
    releases   the on-disk layout: kept releases, the `current` switch, the install's links
    update     the update and rollback job, its record, its recovery after a crash; the
               manager's own update from a release (self-test, store, hand-over, trial)
    fleet      the hub's view of its agents, and the rollout of a release to them
    server     the endpoints, the checks every request passes, the server loop, the watchdog
    cli        the operator's client, install/uninstall, check, self-test, serve, main

    python3 backend_ai_manager.py serve --role hub
"""

import argparse
import collections
import contextlib
import errno
import functools
import hashlib
import ipaddress
import json
import logging
import os
import posixpath
import queue
import re
import selectors
import shutil
import shlex
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import zlib
from _operator import _compare_digest as compare_digest  # hmac's, without importing hmac

# Not imported here, to keep the idle daemon small (each is imported where first needed):
# ssl (an https:// release or health URL), ctypes (the atomic exchange), resource. No
# http.server, http.client, email or urllib: the HTTP server and client below are our own.

__version__ = "0.1.0"

log = logging.getLogger("backend-ai-manager")


# ============================================================================================
# Core: the errors (one small hierarchy: below the HTTP layer an error says what went wrong,
# never which HTTP status it is; error_answer() in the server turns any of them into the one
# JSON error shape), test failpoints, file helpers, logging (one line per event on stderr;
# under journald each line carries its priority: sd-daemon(3)), running a command (the one
# place that runs another program: argument list, small fixed environment, a timeout that
# kills the whole process group), and one call shared by concurrent callers.
# ============================================================================================


class ManagerError(Exception):
    """Anything the manager refuses or fails at; `message` says what was wrong, with the value."""

    def __init__(self, message):
        super().__init__(message)
        self.message = message


class InvalidInput(ManagerError):
    """A value given to the manager is not acceptable (a version, a line count, a body)."""


class Busy(ManagerError):
    """An update or rollback is running, or there is nothing to roll back to."""


class SystemdError(ManagerError):
    """systemctl or journalctl failed, or did not finish in time (timed_out)."""

    def __init__(self, message, timed_out=False):
        super().__init__(message)
        self.timed_out = timed_out


class ConfigError(ManagerError):
    """An invalid setting: the daemon stops at start with this one line."""


class ReleaseError(ManagerError):
    """A release that cannot be installed (download, checksum, archive or content)."""


class NoSuchRelease(ReleaseError):
    """The NAS has no file at the release's URL (it answered 404)."""


def describe(error):
    """The one way an error is put in words: a ManagerError's message; "timed out" for a
    timeout; an OSError's strerror (after the file, when it names one); anything else, which
    nothing expected, as "internal error: ..."."""
    if isinstance(error, ManagerError):
        return error.message
    if isinstance(error, socket.timeout):
        return "timed out"
    if isinstance(error, OSError):
        if not error.strerror:
            return str(error)
        return f"{error.filename}: {error.strerror}" if error.filename else error.strerror
    return f"internal error: {error}"


def _text(value, limit=500):
    """A string cut to `limit` characters (a field of an agent's answer, a log line in an
    error); None for anything that is not a string."""
    return value[:limit] if isinstance(value, str) else None


class HttpError(ManagerError):
    """An answer of the HTTP layer itself: no such endpoint, a wrong method, a body too large,
    a missing token, a refused client."""

    def __init__(self, status, message, headers=None):
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


class WouldWait(Exception):
    """An answer made by the connection thread (Api.instant) would have to wait for a lock or a
    systemctl call: a worker makes it instead."""


EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NOT_RUNNING, EXIT_UNREACHABLE = 0, 1, 2, 3, 4


class ClientError(ManagerError):
    """The command cannot be done; `code` is its exit status."""

    def __init__(self, message, code=EXIT_FAILED):
        super().__init__(message)
        self.code = code


# Failpoints for the crash tests: BACKEND_AI_FAILPOINT=NAME[:N] makes the manager SIGKILL itself
# the Nth time it passes failpoint(NAME), to prove that a crash at that instant leaves a complete
# install that the next start recovers. Unset (always, outside tests) it costs one comparison.
_FAILPOINT, _, _FAIL_AT = os.environ.get("BACKEND_AI_FAILPOINT", "").partition(":")
_passes_left = {_FAILPOINT: int(_FAIL_AT) if _FAIL_AT.isdigit() else 1}


def failpoint(name):
    if name == _FAILPOINT:
        _passes_left[name] -= 1
        if _passes_left[name] <= 0:
            os.kill(os.getpid(), signal.SIGKILL)


class JournalFormatter(logging.Formatter):
    PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
                logging.CRITICAL: 2}

    def __init__(self, journal):
        super().__init__("%(message)s" if journal else "%(asctime)s %(levelname)s %(message)s")
        self.journal = journal

    def format(self, record):
        text = super().format(record)
        if not self.journal:
            return text
        prefix = f"<{self.PRIORITY.get(record.levelno, 6)}>"
        return "\n".join(prefix + line for line in text.splitlines())


def setup_logging(log_requests=False):
    handler = logging.StreamHandler(sys.stderr)
    # systemd sets JOURNAL_STREAM when stderr goes to the journal (systemd.exec(5)).
    handler.setFormatter(JournalFormatter(bool(os.environ.get("JOURNAL_STREAM"))))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False
    # successful GETs and HEADs are DEBUG lines of this child logger (see log_answer)
    logging.getLogger("backend-ai-manager.requests").setLevel(
        logging.DEBUG if log_requests else logging.INFO)


def sd_notify(message):
    """Send one datagram to $NOTIFY_SOCKET (sd_notify(3)); does nothing without it."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
        return True
    except OSError as e:
        log.warning("sd_notify failed: %s", e)
        return False


COMMAND_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LC_ALL": "C.UTF-8", "TZ": "UTC", "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": "cat",
    "PAGER": "cat", "SYSTEMD_LESS": "",
}


class CommandResult:
    def __init__(self, argv, code, out, err, timed_out):
        self.argv, self.code, self.out, self.err, self.timed_out = argv, code, out, err, timed_out

    @property
    def ok(self):
        return self.code == 0 and not self.timed_out

    def message(self):
        """systemd's own words for a failure, for the API's error field."""
        text = (self.err.strip() or self.out.strip() or f"exit status {self.code}")
        if self.timed_out:
            return f"'{' '.join(self.argv)}' timed out"
        return f"'{' '.join(self.argv)}' failed: {text}"


def run_command(argv, timeout, stdin_path=None):
    """Run argv (its standard input: the file `stdin_path`, or nothing); return a
    CommandResult. A timeout kills the process group (subprocess only kills the direct child,
    so grandchildren would survive)."""
    try:
        with open(stdin_path or os.devnull, "rb") as stdin:
            proc = subprocess.Popen(argv, stdin=stdin, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, env=COMMAND_ENV,
                                    start_new_session=True)
    except OSError as e:
        return CommandResult(argv, 127, "", f"cannot run {argv[0]}: {e.strerror}", False)
    try:
        out, err = proc.communicate(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        out, err = proc.communicate()
        timed_out = True
    return CommandResult(argv, proc.returncode, out.decode("utf-8", "replace"),
                         err.decode("utf-8", "replace"), timed_out)


class SingleFlight:
    """One call at a time: callers that arrive while it runs wait and take its result (or its
    error) instead of making their own. A caller of a newer generation does not join a call of
    an older one, whose result may predate a change the caller knows of."""

    class _Call:
        def __init__(self, generation):
            self.generation = generation
            self.done = threading.Event()
            self.result = self.error = None

    def __init__(self):
        self._lock = threading.Lock()
        self._call = None

    def run(self, function, generation=0):
        with self._lock:
            call = self._call
            leader = call is None or call.generation != generation
            if leader:
                call = self._call = self._Call(generation)
        if leader:
            try:
                call.result = function()
            except Exception as e:
                call.error = e
            finally:
                with self._lock:
                    if self._call is call:
                        self._call = None
                call.done.set()
        else:
            call.done.wait()
        if call.error:
            raise call.error
        return call.result


def utc_now():
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path):
    if os.path.islink(path) or os.path.isfile(path):
        os.unlink(path)
    elif os.path.isdir(path):
        shutil.rmtree(path)


def _write_all(fd, data):
    """os.write until every byte of data is written (a write may take fewer)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _write_file(path, data, mode=0o644, durable=True):
    """Write `data` to `path` whole or not at all: a temporary file beside it, renamed over
    `path`; with `durable`, flushed to disk first and the folder after (a power cut keeps
    the old file or the new one)."""
    os.makedirs(os.path.dirname(path), 0o755, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
        try:
            _write_all(fd, data)
            os.fchmod(fd, mode)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        _remove(tmp)
    if durable:
        _fsync_dir(os.path.dirname(path))


@functools.lru_cache(maxsize=None)
def _libc_function(name):
    """A function of the C library (os has no renameat2 or syncfs), or None where missing."""
    try:
        import ctypes
        return getattr(ctypes.CDLL(None, use_errno=True), name)
    except (ImportError, OSError, AttributeError):
        return None


# ============================================================================================
# Settings: declared once (flag, environment variable, per-role default, parser), resolved
# role default < environment < flag, validated before the port is bound.
# ============================================================================================


ROLES = ("hub", "agent")
UNIT_RE = re.compile(r"^[A-Za-z0-9:_.@\\-]{1,250}\.service$")
VERSION_RE = re.compile(r"^[0-9A-Za-z][0-9A-Za-z._+-]{0,63}$")


def parse_version(value):
    """Return `value` if it is a plain version string (no '/', no '..', at most 64 characters)."""
    if not isinstance(value, str) or not VERSION_RE.fullmatch(value) or ".." in value:
        raise InvalidInput(f"invalid version {value!r}: expected a plain version such as '2.0.11' "
                         "(letters, digits, '.', '_', '+', '-'; at most 64 characters; no '..')")
    return value


def _int_in(lo, hi):
    def parse(text):
        if not re.fullmatch(r"[0-9]{1,9}", text) or not lo <= int(text) <= hi:
            raise ValueError(f"expected a whole number from {lo} to {hi}")
        return int(text)
    return parse


def _seconds(hi, lo=0.1):
    """A number of seconds from `lo` to `hi`: a timeout of 0 would disable what it times."""
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise ValueError("expected a number of seconds") from None
        if not lo <= value <= hi:
            raise ValueError(f"expected a number of seconds from {lo:g} to {hi}")
        return value
    return parse


def _on_off(text):  # a _bool given as --flag VALUE, not as a bare --flag
    return _bool(text)


def _bool(text):
    lowered = text.strip().lower()
    if lowered in ("1", "yes", "true", "on"):
        return True
    if lowered in ("", "0", "no", "false", "off"):
        return False
    raise ValueError("expected yes/no, true/false, on/off or 1/0")


def _service(text):
    if not UNIT_RE.fullmatch(text):
        raise ValueError("expected a systemd service unit name such as 'ai-hub.service'")
    return text


def _abs_dir(text):
    if not text.startswith("/"):
        raise ValueError("expected an absolute path")
    return os.path.normpath(text)


def _bind(text):
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise ValueError("expected an IP address such as 127.0.0.1 or 0.0.0.0") from None


def _http_url(text, allow_empty=False):
    if allow_empty and text == "":
        return ""
    try:
        split_url(text.replace("{version}", "0"))
    except ValueError:
        raise ValueError("expected an http:// or https:// URL") from None
    return text


def split_url(url):
    """(scheme, host, port, path-and-query) of an http:// or https:// URL; ValueError if it is
    not one. The host may be a name, an IPv4 address or a bracketed IPv6 address."""
    match = re.fullmatch(r"(https?)://(\[[0-9A-Fa-f:.]+\]|[^/?#@\[\]:\s]+)(?::([0-9]{1,5}))?"
                         r"([/?][^#\s]*)?(#\S*)?", url)
    if not match:
        raise ValueError(f"not an http:// or https:// URL: {url!r}")
    scheme, host, port, path = match.group(1), match.group(2), match.group(3), match.group(4)
    port = int(port) if port else (443 if scheme == "https" else 80)
    if not 0 < port < 65536:
        raise ValueError(f"bad port in {url!r}")
    if not path:
        path = "/"
    elif path.startswith("?"):
        path = "/" + path
    return scheme, host.strip("[]"), port, path


def _nas_url(text):
    _http_url(text)
    if "{version}" not in text:
        raise ValueError("the release URL must contain '{version}'")
    return text


def read_token_file(path):
    """(token, None) for a valid token file, or (None, what is wrong with it). A valid token is
    at least 16 printable ASCII characters without whitespace; the whitespace around it (a
    trailing newline) is dropped."""
    try:
        with open(path, "rb") as f:
            raw = f.read(4097)
    except OSError as e:
        return None, f"cannot read it: {e.strerror}"
    try:
        token = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        return None, "it holds non-ASCII bytes"
    if not token:
        return None, "it is empty"
    if len(token) > 4096:
        return None, "the token is over 4096 characters"
    if any(not "!" <= c <= "~" for c in token):
        return None, "the token holds whitespace or control characters"
    if len(token) < 16:
        return None, f"the token is {len(token)} characters; at least 16 are needed"
    return token, None


def token_file_exposed(path):
    """A warning if the token file can be read by users other than its owner and group's
    (a secret in a file any local user can read), else None."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if mode & 0o004:
        return (f"the token file {path} is readable by every user (mode "
                f"{stat.S_IMODE(mode):04o}): chmod 600 it")
    return None


def _signers_file(text):
    """An OpenSSH allowed_signers file, checked with ssh-keygen (which must be there)."""
    if text == "":
        return ""
    if not os.path.isabs(text):
        raise ValueError("expected an absolute path")
    try:
        with open(text, "rb") as f:
            keys = [line for line in f.read().decode("utf-8", "replace").splitlines()
                    if line.strip() and not line.lstrip().startswith("#")]
    except OSError as e:
        raise ValueError(f"cannot read it: {e.strerror}") from None
    if not keys:
        raise ValueError("it lists no key: every release would be refused")
    if not shutil.which("ssh-keygen", path=COMMAND_ENV["PATH"]):
        raise ValueError("ssh-keygen (OpenSSH, Debian 11 or newer) is not installed: it checks the "
                         "signatures (apt-get install openssh-client)")
    return text


def _token_file(text):
    if text == "":
        return ""
    problem = read_token_file(text)[1]
    if problem:
        raise ValueError(problem)
    return text


HOST_NAME_RE = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)(?:\.(?!-)[a-z0-9_-]{1,63}(?<!-))*$")


def _allowed_hosts(text):
    """'name,.domain' -> a frozenset of lower-case names ('.domain': any name under it);
    '*' -> None, no check of Host names at all."""
    if text.strip() == "*":
        return None
    names = set()
    for part in text.split(","):
        name = part.strip().lower().rstrip(".")
        if not name:
            continue
        if not HOST_NAME_RE.fullmatch(name.lstrip(".")) or name.startswith(".."):
            raise ValueError(f"{part.strip()!r} is not a DNS name (or .domain, or * alone)")
        names.add(name)
    return frozenset(names)


AGENT_RE = re.compile(r"^(?:\[([0-9A-Fa-f:.]+)\]|([A-Za-z0-9._-]{1,254}))(?::([0-9]{1,5}))?$")


def canonical_host(host):
    """A host as one spelling: an IPv6 address compressed in brackets, an IPv4 address in
    dotted decimal, a name in lower case without the trailing dot. Raises ValueError for a
    name with an empty or over-long label, and for digits and dots that are not a dotted-
    decimal IPv4 address (the resolver would read `010.0.0.1` as octal: 8.0.0.1)."""
    if host.startswith("["):
        try:
            return f"[{ipaddress.IPv6Address(host[1:-1])}]"
        except ValueError:
            raise ValueError("no valid IPv6 address in brackets") from None
    name = host.lower()
    name = name[:-1] if name.endswith(".") else name
    if re.fullmatch(r"[0-9.]+", name) or re.fullmatch(r"0x[0-9a-f.x]+", name):
        try:
            return str(ipaddress.IPv4Address(name))
        except ValueError:
            raise ValueError("not an IPv4 address in dotted decimal (no leading zeros: a "
                             "resolver reads them as octal)") from None
    if len(name) > 253 or not HOST_NAME_RE.fullmatch(name):
        raise ValueError("not a host name (labels of 1 to 63 letters, digits, '-')")
    return name


def parse_agents(text, strict=True):
    """`host[:port]` entries (port 3081 when left out), separated by commas or lines, `#`
    comments allowed -> ['host:port', ...] in the order given, each spelled one way
    (canonical_host) and listed once. Raises ValueError naming an invalid entry; with
    strict False, keeps it as it is written instead (an agents file edited while the hub
    runs: that entry fails as that agent's error, never the whole fleet's)."""
    agents = []
    for line in text.splitlines():
        for entry in line.split("#", 1)[0].split(","):
            entry = entry.strip()
            if not entry:
                continue
            match = AGENT_RE.fullmatch(entry)
            port = int(match.group(3)) if match and match.group(3) else 3081
            try:
                if not match or not 1 <= port <= 65535:
                    raise ValueError("not host[:port]")
                host = canonical_host(f"[{match.group(1)}]" if match.group(1) else match.group(2))
                agent = f"{host}:{port}"
            except ValueError as e:
                if strict:
                    raise ValueError(f"{entry!r}: {e}") from None
                agent = entry
            if agent not in agents:
                agents.append(agent)
    return agents


def read_agents(text, strict=True):
    """The agents of an --agents value: a list, or @FILE with one agent a line (read now).
    Raises ValueError saying what is wrong (see parse_agents for `strict`)."""
    if text.startswith("@"):
        path = text[1:]
        if not path.startswith("/"):
            raise ValueError("expected @/absolute/path")
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read(1 << 20)
        except OSError as e:
            raise ValueError(f"cannot read {path}: {e.strerror}") from None
    return parse_agents(text, strict)


def _agents(text):
    read_agents(text)  # checked at start; an @FILE is read again at each use
    return text


def _batches(text):
    """'1,25%,100%' -> [(1, False), (25, True), (100, True)]: counts or percentages of all
    agents, each at least 1 agent; the last one repeats."""
    batches = []
    for part in text.split(","):
        part = part.strip()
        match = re.fullmatch(r"([0-9]{1,6})(%?)", part)
        if not match or int(match.group(1)) < 1 or (match.group(2) and int(match.group(1)) > 100):
            raise ValueError(f"{part!r} is not a count (1 or more) or a percentage (1% to 100%)")
        batches.append((int(match.group(1)), bool(match.group(2))))
    return batches


def _networks(text):
    if text.strip() == "":
        return ()
    try:
        return tuple(ipaddress.ip_network(part.strip(), strict=False) for part in text.split(","))
    except ValueError as e:
        raise ValueError(f"expected CIDR[,CIDR...]: {e}") from None


# name, flag, environment variable, parser, help
class Option:
    """One setting, declared once: its name (the flag --name-with-dashes and the variable
    BACKEND_AI_NAME follow from it), its parser (text -> value, ValueError if invalid), its
    default (one text, or one per role), whether only a hub takes it, and its help. Iterating
    gives (name, flag, variable, parser, help)."""

    def __init__(self, name, parse, default, text, hub_only=False):
        self.name, self.parse, self.default, self.help = name, parse, default, text
        self.hub_only = hub_only
        self.flag = "--" + name.replace("_", "-")
        self.env = "BACKEND_AI_" + name.upper()

    def default_for(self, role):
        return self.default[role] if isinstance(self.default, dict) else self.default

    def __iter__(self):
        return iter((self.name, self.flag, self.env, self.parse, self.help))


NAS = "http://192.168.1.10:8888/api/raw/{version}"  # the seed's NAS, as an example default
OPTIONS = [
    Option("role", None, None, "hub or agent: picks the defaults"),
    Option("service", _service, {"hub": "ai-hub.service", "agent": "ai-agent.service"},
           "the systemd unit controlled"),
    Option("install_dir", _abs_dir, {"hub": "/opt/backend-ai/hub",
                                     "agent": "/opt/backend-ai/agent"},
           "where dist/ and package.json live"),
    Option("bind", _bind, {"hub": "127.0.0.1", "agent": "0.0.0.0"},
           "address the API listens on"),
    Option("port", _int_in(1, 65535), "3081", "port the API listens on"),
    Option("nas_url", _nas_url, {"hub": NAS + "/hub-{version}.tar.gz",
                                 "agent": NAS + "/agent-{version}.tar.gz"},
           "release URL, {version} substituted"),
    Option("state_dir", _abs_dir, {"hub": "/var/lib/backend-ai-manager/hub",
                                   "agent": "/var/lib/backend-ai-manager/agent"},
           "update record, staging and kept releases"),
    Option("keep_backups", _int_in(1, 100), "3", "previous releases kept for rollback"),
    Option("settle", _seconds(3600, lo=0), "5",
           "seconds a restarted service must stay active (0: only check it is active)"),
    Option("require_checksum", _bool, "no", "refuse a release without a matching .sha256"),
    Option("health_url", lambda t: _http_url(t, allow_empty=True), "",
           "must answer 2xx after a restart"),
    Option("token_file", _token_file, "", "require 'Authorization: Bearer <token>'"),
    Option("allow", _networks, "", "clients outside these CIDRs get 403"),
    Option("allowed_hosts", _allowed_hosts, "",
           "DNS names accepted in Host besides localhost and this machine's names (.domain: "
           "any name under it; *: no check)"),
    Option("log_requests", _bool, "no",
           "log every request (by default only those that change something, fail or are "
           "refused)"),
    Option("download_timeout", _seconds(86400), "600", "total deadline of a release download"),
    Option("max_download_mb", _int_in(1, 1 << 20), "2048", "largest release tarball accepted"),
    Option("max_unpacked_mb", _int_in(1, 1 << 22), "8192", "largest unpacked release accepted"),
    Option("command_timeout", _seconds(3600), "90",
           "seconds a systemctl start/stop/restart may take before the API answers 504"),
    Option("max_connections", _int_in(1, 10000), "256",
           "open connections at most; past that a client gets 503"),
    Option("request_timeout", _seconds(3600), "10",
           "seconds a client has to send a whole request"),
    Option("max_file_mb", _int_in(1, 1 << 22), "2048",
           "largest single file of a release accepted"),
    Option("max_members", _int_in(1, 10_000_000), "200000", "most files a release may hold"),
    Option("release_signers", _signers_file, "",
           "an OpenSSH allowed_signers file: every release must carry a .sha256.sig by one of "
           "its keys"),
    Option("manager_updates", _on_off, "on",
           "update this manager from a release that carries a newer one (off: never)"),
    Option("manager_trial", _seconds(86400, lo=1), "30",
           "seconds a new manager is on trial: if it dies in them, the last good one returns"),
    Option("agents", _agents, "", "host[:port],... or @FILE (one a line), the agents' managers",
           hub_only=True),
    Option("agent_token_file", _token_file, "", "the bearer token sent to agents",
           hub_only=True),
    Option("rollout_batches", _batches, "1,25%,100%",
           "batch sizes, counts or percentages; the first is the canary, the last repeats",
           hub_only=True),
    Option("rollout_parallel", _int_in(1, 256), "4", "agents updated at once inside a batch",
           hub_only=True),
    Option("rollout_max_failures", _int_in(0, 100000), "0",
           "failures the whole rollout may have; one more halts it", hub_only=True),
    Option("rollout_agent_timeout", _seconds(86400), "900",
           "longest one agent's update may take", hub_only=True),
]
# Settings only a hub takes: an agent given one (by flag or variable) refuses to start.
HUB_ONLY = tuple(option.name for option in OPTIONS if option.hub_only)


class Settings:
    """The resolved, validated, frozen configuration of the daemon."""

    def __init__(self, values):
        for key, value in values.items():
            object.__setattr__(self, key, value)

    def __setattr__(self, key, value):
        raise AttributeError("settings are frozen")

    def token(self):
        """The bearer token clients must send, None without --token-file; raises ConfigError
        while the file is not valid (the manager then refuses every request: fail closed)."""
        return _read_token(self.token_file, "--token-file")

    def agent_token(self):
        return _read_token(self.agent_token_file, "--agent-token-file")

    def agent_list(self):
        """The agents, read afresh (an @FILE list changes without a restart); raises
        ConfigError if it cannot be read or parsed now."""
        try:
            return read_agents(self.agents, strict=False)
        except ValueError as e:
            raise ConfigError(f"cannot read the agent list {self.agents!r}: {e}") from None


def _read_token(path, flag):
    if not path:
        return None
    token, problem = read_cached(path, read_token_file)
    if problem:
        raise ConfigError(f"the token file {path} ({flag}) is not valid: {problem}")
    return token


_file_cache = {}


def read_cached(path, parse):
    """parse(path), parsed again only when the file's (mtime, inode, size) changed: one stat()
    per use, so a hand edit or a swapped release is seen at once, without reading the file on
    every request. A file that cannot be stat()ed is parsed uncached: parse() says what is
    wrong with it."""
    try:
        st = os.stat(path)
    except OSError:
        return parse(path)
    key = (st.st_mtime_ns, st.st_ino, st.st_size, st.st_dev)
    hit = _file_cache.get((path, parse))
    if hit is not None and hit[0] == key:
        return hit[1]
    value = parse(path)
    _file_cache[(path, parse)] = (key, value)
    return value


def resolve_settings(flags, environ):
    """Resolve role default < environment < flag for every option; raise ConfigError on any bad one.

    `flags` maps option names to the command-line value or None."""
    role = flags.get("role") or environ.get("BACKEND_AI_ROLE", "")
    if role not in ROLES:
        raise ConfigError(f"invalid role {role!r}: pass --role hub or --role agent "
                          "(or set BACKEND_AI_ROLE)")
    values = {"role": role, "title": role.title()}
    # Where each value came from, for `check`: {name: (text, "command line", a variable or
    # "default")}.
    values["sources"] = sources = {"role": (role, "command line" if flags.get("role") else
                                            "BACKEND_AI_ROLE")}
    for option in OPTIONS[1:]:
        name, flag, env, parse, _help = option
        if flags.get(name) is not None:
            raw, origin = flags[name], "command line"
        elif env in environ:
            raw, origin = environ[env], env
        else:
            raw, origin = option.default_for(role), "default"
        sources[name] = ("yes" if raw is True else raw, origin)
        if name in HUB_ONLY and role != "hub" and origin != "default":
            raise ConfigError(f"{flag} ({origin}) is a hub setting; an agent does not take it")
        if isinstance(raw, bool):
            raw = "yes" if raw else "no"
        try:
            values[name] = parse(raw)
        except ValueError as e:
            raise ConfigError(f"invalid {flag} ({origin}) {raw!r}: {e}") from None
    if values["install_dir"] == values["state_dir"] or values["state_dir"].startswith(
            values["install_dir"].rstrip("/") + "/"):
        raise ConfigError("--state-dir must be outside --install-dir: "
                          f"{values['state_dir']!r} is inside {values['install_dir']!r}")
    return Settings(values)


# ============================================================================================
# systemd adapter: systemctl and journalctl for one unit. Parses Key=Value output (the order of
# `systemctl show -p` is D-Bus order, not -p order) and never maps exit codes to states.
# ============================================================================================


SHOW_PROPERTIES = ("LoadState", "ActiveState", "SubState", "MainPID", "ActiveEnterTimestamp",
                   "NRestarts", "Result")


def parse_show(text):
    """Parse `systemctl show` output into a dict of property -> string."""
    props = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            props[key] = value
    return props


def parse_timestamp(text):
    """'Fri 2026-11-27 21:00:00 UTC' (systemctl with TZ=UTC) -> '2026-11-27T21:00:00Z';
    '' -> None."""
    match = re.match(r"^\w{3} (\d{4}-\d{2}-\d{2}) (\d{2}:\d{2}:\d{2}) UTC$", text.strip())
    if match:
        return f"{match.group(1)}T{match.group(2)}Z"
    return text.strip() or None


class Systemd:
    """systemctl/journalctl for one unit. Raises SystemdError (timed_out when it took too long).

    `systemctl show` is shared: concurrent callers wait for the one call in flight, and
    status() may reuse a result up to STATUS_MAX_AGE seconds old. Every start/stop/restart
    the manager makes starts a new generation, and no result of an older generation is ever
    returned after it, so an answer never predates an action the manager took."""
    QUERY_TIMEOUT = 15
    STATUS_MAX_AGE = 0.5

    def __init__(self, unit, control_timeout=90):
        self.unit = unit
        self.control_timeout = control_timeout
        self._lock = threading.Lock()
        self._generation = 0
        self._shows = SingleFlight()
        self._cached = None  # (monotonic time, generation, props)

    def invalidate(self):
        with self._lock:
            self._generation += 1
            self._cached = None

    def _run(self, argv, timeout=QUERY_TIMEOUT):
        result = run_command(argv, timeout)
        if not result.ok:
            raise SystemdError(result.message(), timed_out=result.timed_out)
        return result.out

    def _show(self):
        return parse_show(self._run(["systemctl", "show", self.unit, "-p",
                                     ",".join(SHOW_PROPERTIES)]))

    def show(self, max_age=0.0, wait=True):
        """The unit's properties: a cached result younger than max_age, or the call in flight,
        or a new call (without `wait`, only the cached result, else WouldWait)."""
        with self._lock:
            cached = self._cached
            if max_age and cached and cached[1] == self._generation \
                    and time.monotonic() - cached[0] <= max_age:
                return dict(cached[2])
            if not wait:
                raise WouldWait()
            generation = self._generation

        def show():
            props = self._show()
            with self._lock:
                if generation == self._generation:
                    self._cached = (time.monotonic(), generation, props)
            return props
        return dict(self._shows.run(show, generation))

    def status(self, max_age=0.0, wait=True):
        props = self.show(max_age, wait)
        restarts = props.get("NRestarts", "")
        pid = props.get("MainPID", "0")
        return {
            "running": props.get("ActiveState") == "active",
            "service": self.unit,
            "load_state": props.get("LoadState"),
            "active_state": props.get("ActiveState"),
            "sub_state": props.get("SubState"),
            "main_pid": int(pid) if pid.isdigit() and pid != "0" else None,
            "since": parse_timestamp(props.get("ActiveEnterTimestamp", "")),
            "restarts": int(restarts) if restarts.isdigit() else None,
            "result": props.get("Result"),
        }

    def control(self, action):
        """systemctl start|stop|restart; returns once systemd has finished the job."""
        self.invalidate()
        try:
            if action in ("start", "restart"):
                # A start asked for explicitly must not be refused by the start rate limit that
                # earlier restarts or a crash loop used up ("Start request repeated too quickly").
                # Cleared before, not after a failure: the unit's Result does not tell that
                # case apart (it keeps exit-code from the crash loop), and a retry would start a
                # failing unit twice and undo a stop that cancelled the start.
                run_command(["systemctl", "reset-failed", self.unit], self.QUERY_TIMEOUT)
            self._run(["systemctl", action, self.unit], self.control_timeout)
        finally:
            self.invalidate()

    def logs(self, lines, output="short-iso"):
        return self._run(["journalctl", "-u", self.unit, "-n", str(lines), "--no-pager", "-o",
                          output])


# The hardening that makes systemd mount a fresh /proc for the unit: refused inside a Proxmox
# container without nesting (its AppArmor profile allows proc only at /proc), where the unit
# would die with status 226/NAMESPACE before the manager runs. So it lives in a drop-in that
# `install` writes only when a probe with the same properties passes.
NAMESPACE_HARDENING = ("ProtectKernelTunables=yes", "ProtectControlGroups=yes")


def running_hardening(cgroup_file="/proc/self/cgroup"):
    """For /status: "full" when the unit this manager runs in has the namespace hardening of
    the drop-in in effect, "without the namespace drop-in" when it does not, "not a systemd
    service" outside a unit. Asked of systemd once, at start."""
    try:
        with open(cgroup_file) as f:
            unit = f.read().strip().splitlines()[-1].rpartition("/")[2]
    except (OSError, IndexError):
        unit = ""
    if not unit.endswith(".service") or not os.environ.get("INVOCATION_ID"):
        return "not a systemd service"
    result = run_command(["systemctl", "show", unit, "-p",
                          ",".join(p.partition("=")[0] for p in NAMESPACE_HARDENING)], 15)
    props = parse_show(result.out) if result.ok else {}
    if all(props.get(k) == v for k, _, v in (p.partition("=") for p in NAMESPACE_HARDENING)):
        return "full"
    return "without the namespace drop-in"


# ============================================================================================
# HTTP/1.1 on the wire, both ways: one head parser and one framing for requests (the server's)
# and answers (the client's); one client (a deadline for every step, every address tried, TLS
# for https://, no proxies, no redirects unless asked, bounded answers) for the NAS download,
# the health gate, the hub's calls to its agents and the operator's client, with one place
# that opens outbound connections (_connect). Many agent calls run at once in one thread on a
# selector (run_agent_calls), built on the same pieces.
# ============================================================================================


CHUNK = 64 << 10  # the pieces the download, gunzip and extraction hand on (memory: see README)


class HttpClientError(ReleaseError):
    """A GET that got no usable answer: no connection, a timeout, a malformed answer."""


HEAD_END = re.compile(rb"\n\r?\n")  # the first empty line of a head (a bare LF ends a line too)
MAX_HEAD = 65536


MAX_BODY = 4096


TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # a header name (RFC 9110 5.1)
STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([0-9]{3})(?: ([^\r\n]*))?\r?$")


def parse_header_lines(lines, error):
    """{lower-case name: [values]} of a head's header lines (bytes), for requests and answers
    alike; `error(text)` makes the exception raised for a line that is not `token: value`
    (strict where parsers disagree, RFC 9112 5) or continued on the next (obsolete folding)."""
    headers = {}
    for raw_line in lines:
        if raw_line[:1] in (b" ", b"\t"):
            raise error("folded header lines are not accepted")
        name, sep, value = raw_line.rstrip(b"\r").decode("latin-1").partition(":")
        if not sep or not TOKEN.fullmatch(name) or any(c in value for c in "\0\r"):
            raise error(f"malformed header line {raw_line[:60]!r}")
        headers.setdefault(name.lower(), []).append(value.strip(" \t"))
    return headers


class HttpRequest:
    """One request as the server read it. `close`: the connection ends after the answer
    (HTTP/1.0 without keep-alive, `Connection: close`, or a body that could not be framed)."""

    __slots__ = ("method", "target", "path", "query", "version", "headers", "body", "close",
                 "client", "started", "instant")

    def __init__(self, client, started):
        self.client, self.started = client, started
        self.instant = False  # answered by the connection thread: never wait (WouldWait)
        self.method = self.target = self.path = self.version = None
        self.query, self.headers, self.body, self.close = "", {}, b"", True

    def header(self, name, default=""):
        values = self.headers.get(name)
        return values[0] if values else default

    def json(self):
        try:
            data = json.loads(self.body.decode("utf-8") if self.body else "")
        except (ValueError, UnicodeDecodeError) as e:
            raise InvalidInput(f"request body is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise InvalidInput("request body must be a JSON object")
        return data

    def query_values(self, name):
        """The values of query parameter `name`, %-decoded (as parse_qs)."""
        found = []
        for part in self.query.split("&"):
            key, _, value = part.partition("=")
            if _unquote(key) == name:
                found.append(_unquote(value))
        return found


def _unquote(text):
    raw = re.sub(rb"%([0-9A-Fa-f]{2})", lambda m: bytes([int(m.group(1), 16)]),
                 text.replace("+", " ").encode("latin-1", "replace"))
    return raw.decode("utf-8", "replace")


def read_request(buf, client):
    """The first request in `buf`: (bytes it takes, HttpRequest, None), or (bytes, HttpRequest,
    the error to answer) for a request refused as malformed; None while the head is not whole,
    (bytes, None, None) while its body is not (the caller waits for that many bytes instead
    of parsing the head again at every read). Framing and parsing are one step: the body's
    length comes from the headers the strict parser accepted, so no request can be framed one
    way and parsed another (request smuggling). A refused request closes its connection after
    the answer (request.close), so nothing after it is read as another request."""
    match = HEAD_END.search(buf)
    if not match and len(buf) <= MAX_HEAD:
        return None
    request = HttpRequest(client, time.monotonic())
    end = match.end() if match else len(buf)
    try:
        if not match or match.start() > MAX_HEAD:
            raise HttpError(431, f"request head over {MAX_HEAD} bytes")
        parse_head(request, bytes(buf[:match.start()]))
        length = body_length(request)
    except ManagerError as e:
        request.close = True
        return end, request, e
    if len(buf) < end + length:
        return end + length, None, None
    request.body = bytes(buf[end:end + length])
    return end + length, request, None


def parse_head(request, head):
    """Fill `request` from its head (the bytes before the empty line); raise HttpError for
    anything malformed. Strict where parsers disagree: a header line that is not
    `token: value`, or one continued on the next line (obsolete folding, RFC 9112 5.2), is
    refused rather than guessed at."""
    lines = head.split(b"\n")
    line = lines[0].rstrip(b"\r").decode("latin-1")
    if len(line) > 65536:
        raise HttpError(414, "request line over 65536 bytes")
    words = line.split()
    if len(words) == 3:
        request.method, request.target, request.version = words
        version = re.fullmatch(r"HTTP/([0-9]{1,10})\.([0-9]{1,10})", request.version)
        if not version:
            raise HttpError(400, f"bad request version {request.version[:40]!r}")
        if (int(version.group(1)), int(version.group(2))) not in ((1, 0), (1, 1)):
            raise HttpError(400, f"unsupported HTTP version in {line[:80]!r}: use HTTP/1.0 "
                                 "or HTTP/1.1")
    elif len(words) == 2 and words[0] == "GET":  # the HTTP/0.9 form: answered, then closed
        request.method, request.target, request.version = words[0], words[1], "HTTP/0.9"
    else:
        raise HttpError(400, f"bad request line {line[:80]!r}")
    if len(lines) > 101:
        raise HttpError(431, "more than 100 header lines")
    request.headers = headers = parse_header_lines(lines[1:], lambda text: HttpError(400, text))
    if len(headers.get("host", ())) > 1:
        raise HttpError(400, "more than one Host header")  # RFC 9112 3.2
    connection = {t.strip().lower() for t in request.header("connection").split(",")}
    if "close" not in connection:  # RFC 9112 9.3
        request.close = not (request.version == "HTTP/1.1" or (
            request.version == "HTTP/1.0" and "keep-alive" in connection))
    target = request.target
    if target[:7].lower() == "http://" or target[:8].lower() == "https://":
        target = "/" + target.split("//", 1)[1].partition("/")[2]  # absolute form
    if target.startswith("//"):
        target = "/" + target.lstrip("/")
    target = target.partition("#")[0]
    request.path, _, request.query = target.partition("?")


def body_length(request):
    """The length of the body: exactly Content-Length bytes follow the head (none without
    it). Transfer-Encoding, an odd or repeated Content-Length, or one over MAX_BODY cannot be
    framed safely: an error, and the connection closes."""
    if request.headers.get("transfer-encoding"):
        raise InvalidInput("Transfer-Encoding is not supported; send Content-Length")
    lengths = request.headers.get("content-length") or []
    if not lengths:
        return 0
    if len(lengths) > 1 or not re.fullmatch(r"[0-9]{1,10}", lengths[0]):
        raise InvalidInput(f"invalid Content-Length {lengths!r}")
    length = int(lengths[0])
    if length > MAX_BODY:
        raise HttpError(413, f"request body of {length} bytes is over the limit of "
                             f"{MAX_BODY} bytes")
    return length


def request_bytes(method, netloc, path, headers=(), body=None):
    """An HTTP/1.1 request of this manager's clients: `Connection: close`, and a JSON body
    with its Content-Length when `body` is not None."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {netloc}",
             f"User-Agent: backend-ai-manager/{__version__}", "Connection: close", *headers]
    data = b"" if body is None else json.dumps(body).encode()
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(data)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + data


class HttpResponse:
    """An answer read from `sock` (or, with sock None, from the bytes `buffered` alone):
    `status`, `reason`, `headers` (lower-case name -> first value) and the body, de-chunked
    and bounded by Content-Length, through read1() (at most one recv) and read(). The head is
    parsed by the server's own header parser; an answer framed two ways (two different
    Content-Lengths) is refused. A body cut short is an error, never a short success. With a
    `deadline` (time.monotonic()), no read waits past it: a server trickling its answer a
    byte at a time cannot hold the caller longer."""

    def __init__(self, sock, buffered, timeout=None, deadline=None):
        self.sock = sock
        self._buf = bytes(buffered)
        self._eof = sock is None
        self._timeout, self._deadline = timeout, deadline
        lines = self._head().split(b"\n")
        match = STATUS_LINE.fullmatch(lines[0])
        if not match:
            raise HttpClientError(f"malformed answer: {lines[0][:80]!r}")
        self.status = int(match.group(1))
        self.reason = (match.group(2) or b"").decode("latin-1").strip()
        if len(lines) > 101:
            raise HttpClientError("malformed answer: more than 100 header lines")
        fields = parse_header_lines(lines[1:], lambda text: HttpClientError(
            f"malformed answer: {text}"))
        self.headers = {name: values[0] for name, values in fields.items()}
        lengths = set(fields.get("content-length", ()))
        self._chunked = "chunked" in self.headers.get("transfer-encoding", "").lower()
        if not self._chunked and (len(lengths) > 1 or not all(
                re.fullmatch(r"[0-9]{1,18}", n) for n in lengths)):
            raise HttpClientError(f"malformed answer: Content-Length {sorted(lengths)!r}")
        self._left = int(lengths.pop()) if lengths and not self._chunked else None
        self._chunk_left = 0

    def _recv(self):
        if self._eof:
            return b""
        if self._deadline is not None:
            self.sock.settimeout(_time_left(self._timeout, self._deadline))
        data = self.sock.recv(CHUNK)
        if not data:
            self._eof = True
        return data

    def _head(self):
        while True:
            match = HEAD_END.search(self._buf)
            if match and match.start() <= MAX_HEAD:
                head, self._buf = self._buf[:match.start()], self._buf[match.end():]
                return head
            if len(self._buf) > MAX_HEAD:
                raise HttpClientError("malformed answer: a head over 64 KiB")
            data = self._recv()
            if not data:
                raise HttpClientError("the server closed the connection without an answer")
            self._buf += data

    def _raw(self, size):
        """Up to `size` bytes of the connection, buffered ones first (at most one recv)."""
        if not self._buf and not self._eof:
            self._buf = self._recv()
        data, self._buf = self._buf[:size], self._buf[size:]
        return data

    def _line(self):
        while b"\r\n" not in self._buf:
            if len(self._buf) > 4096 or self._eof:
                raise HttpClientError("malformed chunked answer")
            self._buf += self._recv()
        line, _, self._buf = self._buf.partition(b"\r\n")
        return line

    def read1(self, size=CHUNK):
        """Up to `size` bytes of the body (at most one recv); b"" at its end."""
        try:
            if self._chunked:
                if self._chunk_left is None:  # the last chunk was read
                    return b""
                if self._chunk_left == 0:
                    size_line = self._line().split(b";")[0].strip()
                    if not re.fullmatch(rb"[0-9A-Fa-f]{1,15}", size_line):
                        raise HttpClientError("malformed chunked answer")
                    self._chunk_left = int(size_line, 16)
                    if self._chunk_left == 0:
                        self._chunk_left = None
                        return b""
                data = self._raw(min(size, self._chunk_left))
                if not data:
                    raise HttpClientError("truncated: the answer ended inside a chunk")
                self._chunk_left -= len(data)
                if self._chunk_left == 0 and self._line() != b"":
                    raise HttpClientError("malformed chunked answer")
                return data
            if self._left is not None:
                if self._left <= 0:
                    return b""
                size = min(size, self._left)
            data = self._raw(size)
            if self._left is not None:
                if not data:
                    raise HttpClientError(f"truncated: the answer ended {self._left} bytes "
                                          "short of its Content-Length")
                self._left -= len(data)
            return data
        except socket.timeout:
            raise HttpClientError("timed out waiting for the server") from None
        except OSError as e:  # a reset, a TLS error: as much an answer cut short
            raise HttpClientError(f"the connection failed: {describe(e)}") from None

    def read(self, size=-1):
        """Up to `size` bytes (all if negative), through as many reads as that takes."""
        parts, got = [], 0
        while size < 0 or got < size:
            data = self.read1(CHUNK if size < 0 else min(CHUNK, size - got))
            if not data:
                break
            parts.append(data)
            got += len(data)
        return b"".join(parts)

    def close(self):
        if self.sock is not None:
            self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def http_get(url, timeout, headers=None, deadline=None):
    """GET `url` over HTTP/1.1 (https:// through ssl, imported only then), without proxies,
    without following redirects; `timeout` per socket operation, and no wait past `deadline`
    (time.monotonic(); None: no overall limit). Returns the HttpResponse, whatever its status;
    raises HttpClientError if there is no answer."""
    scheme, host, port, path = split_url(url)
    try:
        sock = _connect(host, port, timeout, deadline)
    except UnicodeError:
        raise HttpClientError(f"cannot connect to {host[:100]!r}: not a valid host "
                              "name") from None
    except OSError as e:
        raise HttpClientError(f"cannot connect to {host}:{port}: {describe(e)}") from None
    try:
        if scheme == "https":
            import ssl
            sock.settimeout(_time_left(timeout, deadline))
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host)
        if sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        netloc = f"[{host}]" if ":" in host else host
        if port != (443 if scheme == "https" else 80):
            netloc += f":{port}"
        sock.settimeout(_time_left(timeout, deadline))
        sock.sendall(request_bytes("GET", netloc, path, ["Accept-Encoding: identity"] + [
            f"{k}: {v}" for k, v in (headers or {}).items()]))
        return HttpResponse(sock, b"", timeout, deadline)
    except HttpClientError:
        sock.close()
        raise
    except (OSError, ValueError) as e:
        sock.close()
        reason = "timed out" if isinstance(e, socket.timeout) else (
            getattr(e, "strerror", None) or str(e))
        raise HttpClientError(f"no answer from {host}:{port}: {reason}") from None


def _time_left(timeout, deadline):
    """The timeout of the next socket operation: `timeout`, or less so as to end by
    `deadline` (None: no overall limit); socket.timeout once the deadline has passed."""
    if deadline is None:
        return timeout
    left = deadline - time.monotonic()
    if left <= 0:
        raise socket.timeout("past the deadline")
    return left if timeout is None else min(timeout, left)


def _connect(host, port, timeout, deadline=None, start=0):
    """The one place that opens a connection to another host (the NAS, a health URL, an
    agent, a manager for the client). An IP address is used as it is (no resolver); a name is
    resolved, as bytes (a str is encoded with the idna codec, 0.2 MB of modules; UnicodeError
    for a name it refuses). With timeout 0: (a non-blocking socket whose connection is under
    way, for a selector, the index of its address), from the address at `start` on (after
    one that failed). Otherwise a connected socket, each address tried with only the time
    left before `deadline` (socket.create_connection gives each the whole timeout: an
    unreachable IPv6 address would double the wait for the IPv4 one)."""
    try:
        literal = ipaddress.ip_address(host)
        addresses = [(socket.AF_INET6 if literal.version == 6 else socket.AF_INET,
                      (host, port))]
    except ValueError:
        name = host.encode("ascii") if host.isascii() else host.encode("idna")
        addresses = [(family, address) for family, _, _, _, address in socket.getaddrinfo(
            name, port, 0, socket.SOCK_STREAM)]
    error = OSError(f"no address for {host!r}")
    for index, (family, address) in enumerate(addresses[start:], start):
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            if timeout == 0:
                sock.setblocking(False)
                err = sock.connect_ex(address)
                if err not in (0, errno.EINPROGRESS):
                    raise OSError(err, os.strerror(err))
                return sock, index
            sock.settimeout(_time_left(timeout, deadline))
            sock.connect(address)
            return sock
        except OSError as e:
            sock.close()
            error = e
    raise error


def health_check(url, timeout, redirects=5, deadline=None):
    """The HTTP status of GET `url`, following up to `redirects` redirects (a health URL may
    point at a login page or a trailing slash), all of it before `deadline` if given."""
    for _ in range(redirects + 1):
        with http_get(url, timeout, deadline=deadline) as response:
            location = response.headers.get("location", "")
            if response.status not in (301, 302, 303, 307, 308) or not location:
                return response.status
        if location.startswith("/"):
            scheme, host, port, _ = split_url(url)
            host = f"[{host}]" if ":" in host else host
            location = f"{scheme}://{host}:{port}{location}"
        try:
            split_url(location)
        except ValueError:
            raise HttpClientError(f"redirect to {location[:200]!r}, not an http(s) URL") from None
        url = location
    raise HttpClientError(f"more than {redirects} redirects")


def open_url(url, timeout, deadline=None):
    """GET a file of the NAS; returns the 200 response or raises ReleaseError (NoSuchRelease for
    HTTP 404). A redirect is an error: the NAS is a plain file server."""
    try:
        response = http_get(url, timeout, deadline=deadline)
    except HttpClientError as e:
        raise ReleaseError(f"cannot download {url}: {e.message}") from None
    if response.status == 200:
        return response
    response.close()
    if response.status == 404:
        raise NoSuchRelease(f"the NAS has no file {url} (HTTP 404)")
    if 300 <= response.status < 400:
        raise ReleaseError(f"the NAS answered {response.status} redirect to "
                           f"{response.headers.get('location', '?')}; redirects are not "
                           "followed")
    raise ReleaseError(f"the NAS answered HTTP {response.status} {response.reason} for {url}")


AGENT_CONNECT_TIMEOUT = 2.0   # seconds to connect to an agent's manager
AGENT_STATUS_DEADLINE = 5.0   # seconds for a whole GET /status answer
MAX_AGENT_ANSWER = 64 << 10   # bytes an agent's answer may have, head included


class AgentCall:
    """One HTTP/1.1 request to an agent's manager (or, for the client, any manager), driven
    by run_agent_calls(). Afterwards `answered` (an HTTP status line came back), `status` and
    `payload` (the JSON object answered; None unless the whole answer was good), `error` (None
    or what went wrong) and `rtt_ms`."""

    def __init__(self, agent, method, path, body=None, token=None):
        self.agent, self.method, self.path = agent, method, path
        self.status = self.payload = self.error = self.rtt_ms = None
        self.answered = False
        self.sent = False  # the whole request went out
        self.sock = None
        self.address_index = 0
        self.received = bytearray()
        self.limit = MAX_AGENT_ANSWER  # bytes the answer may have, head included
        headers = ["Accept: application/json"]
        if token:
            headers.append(f"Authorization: Bearer {token}")
        self.outgoing = request_bytes(method, agent, path, headers, body)

    def fail(self, error):
        if self.error is None and self.status is None:
            self.error = error
        self.close()

    def close(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def finish(self):
        """Parse what was received once the agent closed (the request asked it to), with the
        same head parser and framing as every other answer."""
        try:
            response = HttpResponse(None, self.received)
            self.answered = True
            body = response.read()
        except HttpClientError as e:
            return self.fail(e.message)
        try:
            payload = json.loads(body.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            return self.fail(f"malformed answer (HTTP {response.status}): not JSON")
        if not isinstance(payload, dict):
            return self.fail("malformed answer: not a JSON object")
        self.status, self.payload = response.status, payload
        self.close()


def run_agent_calls(calls, connect_timeout, deadline):
    """Run every AgentCall at once, until each has its answer or its deadline passed."""
    started = time.monotonic()
    with selectors.DefaultSelector() as selector:
        def connect(call, start=0):
            """Connect to the agent's address at `start` or the next that takes it (every
            address of a name, within the connect deadline: localhost is ::1 first)."""
            try:
                host, _, port = parse_agents(call.agent)[0].rpartition(":")
            except (ValueError, IndexError) as e:  # an entry written into the agents file
                return call.fail(f"not a valid agent: {e}")
            try:
                call.sock, call.address_index = _connect(host.strip("[]"), int(port), 0,
                                                         start=start)
            except (OSError, UnicodeError) as e:
                return call.fail(f"cannot connect: {describe(e)}")
            selector.register(call.sock, selectors.EVENT_WRITE, call)

        for call in calls:
            connect(call)
        connected = set()
        while selector.get_map():
            now = time.monotonic()
            if now - started >= deadline:
                break
            for key in list(selector.get_map().values()):
                call = key.data
                if call not in connected and now - started >= connect_timeout:
                    selector.unregister(key.fileobj)
                    call.fail(f"no connection within {connect_timeout:g} s")
            for key, events in selector.select(timeout=0.05):
                call = key.data
                try:
                    if call not in connected:
                        err = call.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                        if err:
                            selector.unregister(call.sock)
                            call.close()
                            connect(call, call.address_index + 1)  # the next address
                            if call.sock is None:
                                call.error = f"connection failed: {os.strerror(err)}"
                            continue
                        connected.add(call)
                    if call.outgoing:
                        call.outgoing = call.outgoing[call.sock.send(call.outgoing):]
                        if not call.outgoing:
                            call.sent = True
                            selector.modify(call.sock, selectors.EVENT_READ, call)
                        continue
                    data = call.sock.recv(65536)
                    if data:
                        call.received += data
                        call.answered = call.answered or bool(
                            STATUS_LINE.match(call.received.partition(b"\n")[0]))
                        if len(call.received) > call.limit:
                            raise ValueError(f"answer over {call.limit} bytes")
                        continue
                    selector.unregister(call.sock)
                    call.finish()
                except (BlockingIOError, InterruptedError):
                    continue
                except (OSError, ValueError) as e:
                    selector.unregister(key.fileobj)
                    call.fail(str(e) if isinstance(e, ValueError) else
                              f"connection failed: {describe(e)}")
                if call.sock is None or call.status is not None:
                    call.rtt_ms = round((time.monotonic() - started) * 1000, 1)
        for key in list(selector.get_map().values()):
            key.data.fail(f"no answer within {deadline:g} s")
    for call in calls:
        call.close()
        if call.rtt_ms is None and call.status is not None:
            call.rtt_ms = round((time.monotonic() - started) * 1000, 1)
    return calls


# ============================================================================================
# Archives: reading a release tarball safely, and writing one (pack). No
# tarfile.extract/extractall: their filters are absent on Debian's 3.11.2 and 3.9.2 and have been
# bypassed repeatedly (CVE-2025-4517, -4330, -4138, CVE-2024-12718). Every member is checked and
# written by us into a fresh directory. The writer makes reproducible tarballs and checks them
# with the reader.
# ============================================================================================


class Download:
    """A streamed HTTP body: counts and hashes every byte, enforces a size limit and a total
    deadline (the socket's timeout is per operation), reports progress."""

    def __init__(self, response, limit, deadline, progress):
        self.response = response
        self.limit = limit
        self.deadline = deadline
        self.progress = progress
        self.sha256 = hashlib.sha256()
        self.count = 0
        self.aborted = False
        length = response.headers.get("content-length")
        self.total = int(length) if length and length.isdigit() else None
        if self.total is not None and self.total > limit:
            raise ReleaseError(f"release is {self.total} bytes, over the limit of {limit} bytes")

    def abort(self):
        """Make a read blocked on the network (in the prefetch thread) return now, and any later
        read fail, so nothing of this download reaches the record afterwards."""
        self.aborted = True
        try:
            sock = getattr(self.response, "sock", None)
            if sock is not None:
                sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def read(self, size=None):
        if self.aborted:
            raise ReleaseError("download stopped")
        if time.monotonic() > self.deadline:
            raise ReleaseError("download took longer than the deadline (--download-timeout)")
        try:
            # read1: at most one recv, so the deadline is checked however slowly bytes arrive
            data = self.response.read1(min(size or CHUNK, CHUNK))
        except (OSError, HttpClientError) as e:
            if self.aborted:
                raise ReleaseError("download stopped") from None
            if time.monotonic() >= self.deadline:  # the response's reads stop at the deadline
                raise ReleaseError("download took longer than the deadline "
                                   "(--download-timeout)") from None
            raise ReleaseError(f"download failed after {self.count} bytes: {describe(e)}") \
                from None
        if self.aborted:
            raise ReleaseError("download stopped")
        self.count += len(data)
        if self.count > self.limit:
            raise ReleaseError(f"release is over the limit of {self.limit} bytes")
        self.sha256.update(data)
        self.progress(self.count, self.total)
        failpoint("download-chunk")
        return data

    def finish(self):
        """Read to the end; check the byte count against Content-Length (a truncated body ends a
        read loop silently)."""
        while self.read():
            pass
        if self.total is not None and self.count != self.total:
            raise ReleaseError(f"download truncated: got {self.count} of {self.total} bytes")


class _Slices:
    """A file-like reader of the pieces _next() makes (b"" at the end). The reader asks for
    small pieces: each is handed out in slices, so it is never copied again for each small
    read."""

    _buf, _pos = b"", 0

    def read(self, size=-1):
        if size is None or size < 0:
            size = CHUNK
        if self._pos >= len(self._buf):
            self._buf, self._pos = self._next(), 0
        out = self._buf[self._pos:self._pos + size]
        self._pos += len(out)
        return out


class Gunzip(_Slices):
    """File-like gzip decoder over a read function. zlib checks the gzip trailer (CRC-32 and
    length), so a corrupt archive fails here; max_length keeps memory bounded on a bomb."""

    IN_CHUNK = 1 << 16

    def __init__(self, read):
        self._read = read
        self._z = zlib.decompressobj(16 + zlib.MAX_WBITS)

    def _next(self):
        # Up to CHUNK decompressed at once, so zlib's unconsumed input is not copied again
        # for each small read either.
        while not self._z.eof:
            data = self._z.unconsumed_tail or self._read(self.IN_CHUNK)
            try:
                # With the input used up, zlib may still hold output that max_length held
                # back: decompress(b"") hands it out; only when nothing comes is it cut short.
                out = self._z.decompress(data, CHUNK)
            except zlib.error as e:
                raise ReleaseError(f"release archive is not valid gzip: {e}") from None
            if out:
                return out
            if not data:
                raise ReleaseError("release archive is truncated (gzip stream ends early)")
        return b""

    def finish(self):
        while self.read():
            pass
        if self._z.unused_data or self._read(self.IN_CHUNK):
            raise ReleaseError("release archive has data after the end of the gzip stream")


class Prefetch(_Slices):
    """Calls read(CHUNK) on a source in its own thread, up to `depth` chunks ahead, so that the
    download, its SHA-256 and gunzip (which release the GIL) overlap with parsing and writing, as
    `curl | tar xz` overlaps in three processes. An error in the thread is raised by read()."""

    def __init__(self, read, depth=2):
        self._read = read
        self._queue = queue.Queue(depth)
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._run, name="prefetch", daemon=True)
        self._thread.start()

    def _run(self):
        try:
            while not self._stop.is_set():
                data = self._read(CHUNK)
                self._put(data)
                if not data:
                    return
        except BaseException as e:  # handed to the reading thread
            self._put(e)

    def _put(self, item):
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                pass

    def _next(self):
        if self._done:
            return b""
        item = self._queue.get()
        self._done = isinstance(item, BaseException) or not item
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self):
        """Stop the thread (also when the reader gave up early) and wait for it."""
        self._stop.set()
        # A read blocked on the network ends when the caller aborts the download.
        self._thread.join(timeout=5)


def member_path(name):
    """Normalise an archive member name; raise ReleaseError for anything that could leave the
    destination or is not a plain relative path. Returns the name without './' and trailing '/'."""
    if "\0" in name:
        raise ReleaseError(f"archive member {name!r} has a NUL byte")
    if name.startswith("/"):
        raise ReleaseError(f"archive member {name!r} is an absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts:
        raise ReleaseError(f"archive member {name!r} has an empty name")
    if len(parts) > 64:
        raise ReleaseError(f"archive member {name[:80]!r}... is more than 64 folders deep")
    if ".." in parts:
        raise ReleaseError(f"archive member {name!r} contains '..'")
    for part in parts:
        if len(part.encode("utf-8", "surrogateescape")) > 255:
            raise ReleaseError(f"archive member {name!r} has a name part over 255 bytes")
    path = "/".join(parts)
    if len(path.encode("utf-8", "surrogateescape")) > 4000:
        raise ReleaseError(f"archive member {name[:80]!r}... has a path over 4000 bytes")
    return path


def link_target_inside(link_path, target, root):
    """True if symlink `link_path` -> `target` resolves lexically inside `root` ('' is the top)."""
    if target.startswith("/") or "\0" in target or target == "":
        return False
    resolved = posixpath.normpath(posixpath.join(posixpath.dirname(link_path), target))
    if resolved == ".." or resolved.startswith("../"):
        return False
    return root == "" or resolved == root or resolved.startswith(root + "/")


def _open_new(path, mode):
    """Open a new file for writing: never through a link, never over anything."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)


def _create(path, data, mode):
    """Create a new file holding `data`."""
    fd = _open_new(path, mode)
    try:
        _write_all(fd, data)
    finally:
        os.close(fd)


class WriterPool:
    """Threads that make folders and create and fill small files while the caller goes on
    parsing the archive. Creating a file or a folder costs the kernel from a tenth of a
    millisecond to a millisecond and more on the ext4 of our hosts, and creates in different
    threads overlap while the disk is the bottleneck. Where it is not, Python's lock makes
    threads beyond the CPUs cost more than they give, so there is one per CPU, from 2 to 4.

    A job may name an event to wait for (the folder it goes in) and one to set when done (its
    own folder); a job only waits for jobs submitted before it, which other threads already
    hold, so the threads cannot deadlock. Bytes waiting to be written are capped, so memory
    stays bounded whatever the release."""

    def __init__(self, threads=None, budget=1 << 20):
        threads = threads or min(4, max(2, len(os.sched_getaffinity(0))))
        self.jobs = queue.SimpleQueue()  # the C one: a third of queue.Queue's cost per job
        self.budget = budget
        self.pending = 0  # bytes
        self.unfinished = 0  # jobs
        self.error = None
        self.cond = threading.Condition()
        self.threads = [threading.Thread(target=self._work, name="writer", daemon=True)
                        for _ in range(threads)]
        for thread in self.threads:
            thread.start()

    def submit(self, path, data, mode, after=None, done=None):
        """Create file `path` holding `data`, or folder `path` if data is None, once `after`
        (an Event, if given) is set; set `done` afterwards, whatever happened."""
        size = len(data) if data is not None else 0
        with self.cond:
            while self.pending and self.pending + size > self.budget and not self.error:
                self.cond.wait()
            if self.error:
                raise self.error
            self.pending += size
            self.unfinished += 1
        self.jobs.put((path, data, mode, after, done))

    def _work(self):
        while True:
            job = self.jobs.get()
            if job is None:
                return
            path, data, mode, after, done = job
            try:
                if after is not None:
                    after.wait()
                if self.error is None:
                    if data is None:
                        os.mkdir(path, mode)
                    else:
                        _create(path, data, mode)
            except Exception as e:  # recorded, never lost with the thread
                reason = e.strerror if isinstance(e, OSError) else describe(e)
                with self.cond:
                    self.error = self.error or ReleaseError(f"cannot write {path}: {reason}")
            finally:
                if done is not None:
                    done.set()
                with self.cond:
                    self.pending -= len(data) if data is not None else 0
                    self.unfinished -= 1
                    self.cond.notify_all()

    def drain(self):
        """Wait until every submitted job is done; raise the first write error."""
        with self.cond:
            while self.unfinished:
                self.cond.wait()
        if self.error:
            raise self.error

    def close(self):
        for _ in self.threads:
            self.jobs.put(None)
        for thread in self.threads:
            thread.join()


MAX_EXTENDED_HEADER = 1 << 20  # one pax or GNU long-name block
MAX_EXTENDED_TOTAL = 16 << 20   # all of them in one archive
_OCTAL = re.compile(rb"[0-7]*").fullmatch
# Tar member types (POSIX ustar, pax and GNU), as the header's type byte.
REGTYPE, AREGTYPE, LNKTYPE, SYMTYPE, CHRTYPE, BLKTYPE, DIRTYPE, FIFOTYPE, CONTTYPE = (
    b"0", b"\0", b"1", b"2", b"3", b"4", b"5", b"6", b"7")
XHDTYPE, XGLTYPE, SOLARIS_XHDTYPE, GNUTYPE_LONGNAME, GNUTYPE_LONGLINK, GNUTYPE_SPARSE = (
    b"x", b"g", b"X", b"L", b"K", b"S")
DATA_TYPES = (REGTYPE, AREGTYPE, CONTTYPE, GNUTYPE_SPARSE)  # members followed by their data


class TarMember:
    """One member of a tar stream, as TarReader yields it (the fields tarfile.TarInfo has)."""

    __slots__ = ("name", "linkname", "size", "mode", "type")

    def __init__(self, name, linkname, size, mode, kind):
        self.name, self.linkname, self.size, self.mode, self.type = name, linkname, size, mode, kind


def _tar_number(field):
    """A numeric header field: octal text, or base-256 when the top bit is set (GNU)."""
    if field[0] & 0x80:
        value = int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
        return -value if field[0] & 0x40 else value
    text = field.split(b"\0", 1)[0].strip()
    if not _OCTAL(text):
        raise ReleaseError(f"release tarball is damaged or cut short: bad number {text!r}")
    return int(text or b"0", 8)


def _tar_text(field):
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


class TarReader:
    """A lean, strict reader of a tar stream (ustar, pax and GNU long names), in place of
    tarfile's stream mode, which costs three times as much per member and takes any damaged
    or cut-short header for the end of the archive. Yields TarMember objects; the data
    of the member just yielded is read with read(n) or read_all(). Pax and long-name
    blocks are bounded (they are read whole)."""

    ZERO = bytes(512)

    def __init__(self, fileobj):
        self._read = fileobj.read
        self._left = 0      # data bytes of the current member not read yet
        self._padding = 0   # and the padding after them
        self._extended = 0

    def _exact(self, n):
        parts, got = [], 0
        while got < n:
            data = self._read(n - got)
            if not data:
                raise ReleaseError("release tarball is damaged or cut short: it ends inside "
                                   "a member")
            parts.append(data)
            got += len(data)
        return b"".join(parts) if len(parts) != 1 else parts[0]

    def _skip(self, n):
        while n > 0:
            n -= len(self._exact(min(n, CHUNK)))

    def read(self, size=None):
        """Up to `size` bytes of the current member's data; may return fewer (a short read),
        b"" at its end. Raises if the archive ends inside the member."""
        if self._left <= 0:
            return b""
        data = self._read(min(size or CHUNK, self._left))
        if not data:
            raise ReleaseError("release tarball is damaged or cut short: it ends inside a file")
        self._left -= len(data)
        return data

    def read_all(self):
        """All the current member's remaining data, exactly (the header's size is
        authoritative: any number of short reads are joined)."""
        data = self._exact(self._left) if self._left > 0 else b""
        self._left = 0
        return data

    def __iter__(self):
        pax, long_name, long_link = {}, None, None
        while True:
            self._skip(self._left + self._padding)
            self._left = self._padding = 0
            block = self._read(512)
            if len(block) < 512:
                block += self._exact(512 - len(block)) if block else b""
            if not block:
                raise ReleaseError("release tarball is damaged or cut short: no end marker")
            if block == self.ZERO:
                self._check_end()
                return
            stored = _tar_number(block[148:156])
            if stored != 256 + sum(block) - sum(block[148:156]) and stored != 256 + sum(
                    b - 256 if b > 127 else b for b in block[:148] + block[156:]):  # signed sum
                raise ReleaseError("release tarball is damaged or cut short: a header's "
                                   "checksum is wrong")
            kind = block[156:157]
            size = _tar_number(block[124:136])
            if size < 0:
                raise ReleaseError("release tarball is damaged: a negative size")
            if kind in (XHDTYPE, XGLTYPE, SOLARIS_XHDTYPE, GNUTYPE_LONGNAME, GNUTYPE_LONGLINK):
                self._extended += size
                if size > MAX_EXTENDED_HEADER or self._extended > MAX_EXTENDED_TOTAL:
                    raise ReleaseError(f"release archive has an extended header of {size} "
                                       "bytes (or too many of them)")
                data = self._exact(-(-size // 512) * 512)[:size]
                if kind == GNUTYPE_LONGNAME:
                    long_name = _tar_text(data)
                elif kind == GNUTYPE_LONGLINK:
                    long_link = _tar_text(data)
                elif kind != XGLTYPE:  # global pax headers change nothing we use
                    pax = self._pax(data)
                continue
            name = _tar_text(block[0:100])
            # The prefix field exists only with the POSIX magic "ustar\0": GNU headers
            # ("ustar  \0") keep the access and change times there.
            if block[257:263] == b"ustar\0" and block[345] != 0:
                name = _tar_text(block[345:500]) + "/" + name
            name = pax.get("path", long_name or name)
            kind = DIRTYPE if kind == AREGTYPE and name.endswith("/") else kind  # old tars
            info = TarMember(name,
                             pax.get("linkpath", long_link or _tar_text(block[157:257])),
                             int(pax["size"]) if "size" in pax else size,
                             _tar_number(block[100:108]), kind)
            pax, long_name, long_link = {}, None, None
            if kind in DATA_TYPES:
                self._left = info.size
                self._padding = -info.size % 512
            yield info

    def _check_end(self):
        """After the end marker only zeros may follow (the end blocks and the record padding);
        anything else is data a reader of the archive would not see."""
        while True:
            rest = self._read(CHUNK)
            if not rest:
                return
            if rest.strip(b"\0"):
                raise ReleaseError("release archive has data after the end of the tar")

    @staticmethod
    def _pax(data):
        """The 'length key=value\\n' records of a pax header (POSIX.1-2001)."""
        records, pos = {}, 0
        while pos < len(data):
            match = re.match(rb"(\d+) ", data[pos:pos + 20])
            if not match or int(match.group(1)) < len(match.group(0)) + 2:
                raise ReleaseError("release tarball is damaged: a bad pax header")
            end = pos + int(match.group(1))
            key, sep, value = data[pos + len(match.group(0)):end - 1].partition(b"=")
            if not sep or data[end - 1:end] != b"\n":
                raise ReleaseError("release tarball is damaged: a bad pax header")
            records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8",
                                                                           "surrogateescape")
            pos = end
        if "size" in records and not records["size"].isdigit():
            raise ReleaseError("release tarball is damaged: a bad pax size")
        return records


class Extractor:
    """Writes a tar stream into a fresh directory, member by member.

    Regular files: O_CREAT|O_EXCL|O_NOFOLLOW, bytes counted against per-file and total limits,
    mode 0755 or 0644 (no setuid/setgid/sticky, no archive owners). Directories: created by us.
    Symlinks: relative, inside the release, created after every file. Hard links: to a file of
    the release, linked again inside the fresh directory. Everything else is refused, as is any
    duplicate name or a member whose path passes through a symlink or a file."""

    def __init__(self, dest, max_bytes, max_members, progress=None, max_file=None):
        self.dest = dest
        self.max_bytes = max_bytes
        self.max_file = max_file or max_bytes
        self.max_members = max_members
        self.progress = progress or (lambda files, size: None)
        self.written = 0
        self.names = set()
        ready = threading.Event()
        ready.set()
        self.dirs = {"": ready}  # folder -> Event set once the pool has made it
        self.files = set()
        self.links = {}
        self.top = set()

    SMALL = 256 << 10  # files up to this size go to the writer pool; bigger ones are streamed

    def extract(self, fileobj):
        """Extract a whole uncompressed tar stream. Returns the release root (relative path: ''
        or the one wrapping folder)."""
        os.mkdir(self.dest, 0o755)
        self.pool = WriterPool()
        try:
            archive = TarReader(fileobj)
            for member in archive:
                self._member(archive, member)
            self.pool.drain()
        finally:
            self.pool.close()
        root = self._root()
        self._make_links(root)
        return root

    def _member(self, archive, member):
        if len(self.names) + len(self.dirs) >= self.max_members:
            raise ReleaseError(f"release has more than {self.max_members} members")
        kind = member.type
        if kind == DIRTYPE and all(p in ("", ".") for p in member.name.split("/")):
            return  # './' itself, as `tar -C build .` writes it
        path = member_path(member.name)
        if path in self.names:
            raise ReleaseError(f"archive member {path!r} appears twice")
        self.names.add(path)
        self.top.add(path.split("/")[0])
        self._check_parents(path, kind == DIRTYPE)
        if kind == DIRTYPE:
            self._mkdirs(path)
        elif kind in (REGTYPE, AREGTYPE):  # not CONTTYPE or sparse
            self._write(archive, member, path, self._mkdirs(posixpath.dirname(path)))
        elif kind == SYMTYPE:
            self._mkdirs(posixpath.dirname(path))
            self.links[path] = member.linkname
        elif kind == LNKTYPE:
            self._mkdirs(posixpath.dirname(path))
            self._hardlink(path, member.linkname)
        else:
            kind = "device" if kind in (CHRTYPE, BLKTYPE) else (
                "FIFO" if kind == FIFOTYPE else "special")
            raise ReleaseError(f"archive member {path!r} is a {kind} file; only files, "
                               "directories and links are allowed")

    def _check_parents(self, path, is_dir):
        parts = path.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if parent in self.links:
                raise ReleaseError(f"archive member {path!r} passes through the symlink {parent!r}")
            if parent in self.files:
                raise ReleaseError(f"archive member {path!r} is below the file {parent!r}")
        if path in self.dirs and not is_dir:  # a folder made for earlier members may be listed
            raise ReleaseError(f"archive member {path!r} replaces a directory")

    def _mkdirs(self, path):
        """Have the pool make folder `path` and its missing parents, each after its parent;
        return the Event set once `path` exists."""
        ready = self.dirs.get(path)
        if ready is not None:
            return ready
        parent = self._mkdirs(posixpath.dirname(path))
        if len(self.names) + len(self.dirs) >= self.max_members:  # folders count as members
            raise ReleaseError(f"release has more than {self.max_members} members")
        ready = self.dirs[path] = threading.Event()
        self.pool.submit(os.path.join(self.dest, path), None, 0o755, after=parent, done=ready)
        return ready

    def _count(self, data):
        """Count bytes really written against the total limit. (A member's bytes cannot
        exceed its header's size, which _write checks against the per-file limit first.)"""
        self.written += len(data)
        if self.written > self.max_bytes:
            raise ReleaseError(f"release unpacks to more than {self.max_bytes} bytes")

    def _write(self, source, member, path, folder):
        mode = 0o755 if member.mode & 0o111 else 0o644
        target = os.path.join(self.dest, path)
        if member.size > self.max_file:
            raise ReleaseError(f"archive member {path!r} is over the limit of "
                               f"{self.max_file} bytes for one file")
        if member.size <= self.SMALL:
            data = source.read_all()
            self._count(data)
            self.pool.submit(target, data, mode, after=folder)
        else:
            folder.wait()
            if self.pool.error:
                raise self.pool.error
            fd = _open_new(target, mode)
            size = 0
            try:
                while True:
                    data = source.read(CHUNK)
                    if not data:
                        break
                    size += len(data)
                    self._count(data)
                    _write_all(fd, data)
            finally:
                os.close(fd)
            if size != member.size:  # read() raises first if the stream ends early
                raise ReleaseError(f"release tarball is damaged: {path!r} has {size} of "
                                   f"{member.size} bytes")
        self.files.add(path)
        self.progress(len(self.files), self.written)
        failpoint("extract-file")

    def _hardlink(self, path, target):
        target = member_path(target)
        if target not in self.files:
            raise ReleaseError(f"hard link {path!r} points to {target!r}, "
                               "which is not a file of this release")
        self.pool.drain()  # the target may still be waiting in the pool
        os.link(os.path.join(self.dest, target), os.path.join(self.dest, path),
                follow_symlinks=False)
        self.files.add(path)

    def _root(self):
        """The release root: '' or the single wrapping folder (npm pack writes 'package/')."""
        if len(self.top) == 1:
            (only,) = self.top
            if only in self.dirs and only != "package.json":
                return only
        return ""

    def _make_links(self, root):
        for path, target in self.links.items():
            if not link_target_inside(path, target, root):
                raise ReleaseError(f"symlink {path!r} -> {target!r} points outside the release")
        for path, target in sorted(self.links.items()):
            os.symlink(target, os.path.join(self.dest, path))
        # A lexical check misses a target that goes through another link ('a -> .', 'b -> a/../x'):
        # such chained links are resolved on disk, now that all exist, and refused if they leave
        # the release. Links not passing through another link (all of node_modules/.bin) are
        # exact lexically and skip the costly realpath.
        chained = [p for p in self.links if self._through_link(p, self.links[p])]
        if len(chained) > 1000:
            raise ReleaseError(f"release has {len(chained)} symlinks through other symlinks")
        top = os.path.realpath(os.path.join(self.dest, root))
        for path in chained:
            real = os.path.realpath(os.path.join(self.dest, path))
            if real != top and not real.startswith(top + os.sep):
                raise ReleaseError(f"symlink {path!r} -> {self.links[path]!r} "
                                   "resolves outside the release")

    def _through_link(self, path, target):
        """True if resolving target from path's folder passes through another link member."""
        parts = posixpath.dirname(path).split("/") if posixpath.dirname(path) else []
        for part in target.split("/"):
            if part in ("", "."):
                continue
            if part == "..":
                if parts:
                    parts.pop()
                continue
            parts.append(part)
            if "/".join(parts) in self.links:
                return True
        return False


def unpack_release(response, dest, deadline, max_download, max_unpacked, max_members, max_file,
                   on_bytes=None, on_files=None, flusher=None):
    """Download, gunzip and extract a release tarball from an open HTTP `response` into the
    new folder `dest`, in one streamed pass: download, decompression and extraction overlap.
    Returns (release root relative to dest, the finished Download, number of files). Raises
    ReleaseError for anything wrong with the archive or the download; `dest` may then hold
    part of the release, and the caller removes it."""
    download = Download(response, max_download, deadline, on_bytes or (lambda done, total: None))
    gunzip = Gunzip(download.read)
    extractor = Extractor(dest, max_unpacked, max_members, on_files, max_file=max_file)
    stream = Prefetch(gunzip.read)
    if flusher is not None:
        flusher.start()
    try:
        root = extractor.extract(stream)
    except BaseException:
        download.abort()  # the prefetch thread may be blocked reading a stalled NAS
        raise
    finally:
        stream.close()
        if flusher is not None:
            flusher.stop()
    gunzip.finish()
    download.finish()
    return root, download, len(extractor.files)


def read_package_json(path):
    """Return (version, name) from a package.json; raise ReleaseError saying what is wrong."""
    try:
        with open(path, "rb") as f:
            raw = f.read(1 << 20)
        data = json.loads(raw.decode("utf-8"))
    except FileNotFoundError:
        raise ReleaseError(f"{path} does not exist") from None
    except OSError as e:
        raise ReleaseError(f"cannot read {path}: {e.strerror}") from None
    except ValueError as e:
        raise ReleaseError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("version"), str):
        raise ReleaseError(f"{path} has no \"version\" string")
    name = data.get("name")
    return data["version"], name if isinstance(name, str) else None


def parse_checksum(text):
    """`sha256sum` output ('<64 hex>  <file>') or a bare digest -> lower-case hex digest."""
    match = re.match(r"^\s*([0-9a-fA-F]{64})(\s|$)", text)
    if not match:
        raise ReleaseError("the .sha256 file holds no SHA-256 digest")
    return match.group(1).lower()


def verify_release(tree, version, digest, expected_digest):
    """Check a release unpacked at `tree` before anything is switched: the tarball's SHA-256
    against the .sha256 file's (if there was one), the version its package.json names, and
    its dist/ folder. Raises ReleaseError saying what is wrong."""
    if expected_digest and digest != expected_digest:
        raise ReleaseError(f"checksum mismatch: the release's SHA-256 is {digest}, "
                           f"the .sha256 file says {expected_digest}")
    found, _name = read_package_json(os.path.join(tree, "package.json"))
    if found != version:
        raise ReleaseError(f"the release's package.json says version {found!r}, not {version!r}")
    if not os.path.isdir(os.path.join(tree, "dist")):
        raise ReleaseError("the release has no dist/ folder")


# --- signatures: the .sha256 signed with `ssh-keygen -Y sign` (as apt signs its hash list) -----
SIGN_NAMESPACE = "backend-ai-release"
SIGN_TIMEOUT = 30


def signature_key(signature):
    """(key fingerprint, namespace) of an armored SSH signature (PROTOCOL.sshsig), read, not
    checked; None if it is not one. For the messages: ssh-keygen does the checking."""
    import base64
    text = signature.decode("ascii", "replace")
    match = re.search(r"-----BEGIN SSH SIGNATURE-----(.*?)-----END SSH SIGNATURE-----", text, re.S)
    try:
        blob = base64.b64decode("".join(match.group(1).split()), validate=True)
        fields, pos = [], 10  # "SSHSIG" and a version
        for _ in range(2):  # the public key, the namespace
            size = int.from_bytes(blob[pos:pos + 4], "big")
            fields.append(blob[pos + 4:pos + 4 + size])
            pos += 4 + size
    except (AttributeError, ValueError):
        return None
    if not blob.startswith(b"SSHSIG") or not fields[0]:
        return None
    digest = base64.b64encode(hashlib.sha256(fields[0]).digest()).decode().rstrip("=")
    return f"SHA256:{digest}", fields[1].decode("utf-8", "replace")


def check_signature(sums, signature, signers, scratch):
    """Check `signature` (the .sha256.sig) over `sums` (the .sha256's bytes) against the
    allowed_signers file `signers` with ssh-keygen: find-principals, then verify. Returns
    (principal, key fingerprint); raises ReleaseError saying why not."""
    key = signature_key(signature)
    if key is None:
        raise ReleaseError("the release's .sha256.sig is not an SSH signature")
    fingerprint, namespace = key
    sums_path = os.path.join(scratch, "release.sha256")
    sig_path = sums_path + ".sig"
    _write_file(sums_path, sums, durable=False)
    _write_file(sig_path, signature, durable=False)
    found = run_command(["ssh-keygen", "-Y", "find-principals", "-s", sig_path, "-f", signers],
                        SIGN_TIMEOUT)
    if not found.ok or not found.out.strip():
        raise ReleaseError(f"the release is signed by a key that {signers} does not list "
                           f"({fingerprint})")
    principal = found.out.split()[0]
    if namespace != SIGN_NAMESPACE:
        raise ReleaseError(f"the release's signature by {principal} ({fingerprint}) is for "
                           f"{namespace!r}, not {SIGN_NAMESPACE!r}")
    checked = run_command(["ssh-keygen", "-Y", "verify", "-f", signers, "-I", principal, "-n",
                           SIGN_NAMESPACE, "-s", sig_path], SIGN_TIMEOUT, sums_path)
    if not checked.ok:
        said = (checked.err.strip() or checked.out.strip() or "no reason given").splitlines()
        raise ReleaseError(f"the release's signature by {principal} ({fingerprint}) does not "
                           f"hold: {_text(said[-1], 200)}")
    return principal, fingerprint


def sign_file(path, key):
    """`ssh-keygen -Y sign` of `path` with the private key file `key` (a passphrase is asked on
    the terminal; with ssh-agent, `key` may be the public key); writes path.sig."""
    _remove(path + ".sig")
    result = subprocess.run(["ssh-keygen", "-Y", "sign", "-f", key, "-n", SIGN_NAMESPACE, path],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=600)
    if result.returncode != 0 or not os.path.isfile(path + ".sig"):
        said = (result.stderr or result.stdout).decode("utf-8", "replace").strip()
        raise ClientError(f"ssh-keygen could not sign with {key}: {_text(said, 300)}")


# --- pack: a release tarball of a build, reproducibly ------------------------------------------
def _pax_record(key, value):
    text = f" {key}={value}\n".encode("utf-8", "surrogateescape")
    length = len(text) + 1
    while len(str(length)) + len(text) != length:
        length = len(str(length)) + len(text)
    return str(length).encode() + text


def _ustar_block(name, kind, size, mode, linkname):
    def text(value, width):
        return value.encode("utf-8", "surrogateescape")[:width].ljust(width, b"\0")

    def number(value, width):
        return b"%0*o\0" % (width - 1, value)

    block = bytearray(text(name, 100) + number(mode, 8) + number(0, 8) + number(0, 8) +
                      number(size, 12) + number(0, 12) + b" " * 8 + kind + text(linkname, 100) +
                      b"ustar\x0000" + text("root", 32) + text("root", 32) + number(0, 8) +
                      number(0, 8) + bytes(155) + bytes(12))
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def tar_header(name, kind, size=0, mode=0o644, linkname=""):
    """The header block(s) of one member: ustar, with a pax header first when the name or link
    does not fit ustar's fields (over 100 bytes, or not ASCII)."""
    # (an ASCII text's length is its length in bytes; any other text gets a pax record)
    pax = {key: text for key, text in (("path", name), ("linkpath", linkname))
           if len(text) > 100 or not text.isascii()}
    if size >= 8 ** 11:
        pax["size"] = str(size)
    head = b""
    if pax:
        data = b"".join(_pax_record(k, v) for k, v in sorted(pax.items()))
        head = _ustar_block("././@PaxHeader", XHDTYPE, len(data), 0o644, "") + data + \
            bytes(-len(data) % 512)
    return head + _ustar_block(name, kind, size if size < 8 ** 11 else 0, mode, linkname)


def walk_build(build):
    """(name, kind, path, stat, link target) of every entry below `build`, folders before
    their contents, names sorted; refuses what a release cannot hold. Never follows a
    symlink."""
    entries = []

    def visit(folder, prefix):
        with os.scandir(folder) as it:
            children = sorted(it, key=lambda e: e.name)
        for entry in children:
            name = prefix + entry.name
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                target = os.readlink(entry.path)
                if not link_target_inside(name, target, ""):
                    raise ClientError(f"{entry.path} is a symlink to {target!r}, outside the "
                                      "build: a release may only link inside itself")
                entries.append((name, SYMTYPE, entry.path, st, target))
            elif stat.S_ISDIR(st.st_mode):
                entries.append((name + "/", DIRTYPE, entry.path, st, ""))
                visit(entry.path, name + "/")
            elif stat.S_ISREG(st.st_mode):
                entries.append((name, REGTYPE, entry.path, st, ""))
            else:
                raise ClientError(f"{entry.path} is not a file, folder or symlink")

    visit(build, "")
    return entries


MANAGER_IN_RELEASE = "dist/manager/backend_ai_manager.py"  # where a release carries its manager


def manager_version(data):
    """The __version__ a manager file's text declares (read, never run), or None."""
    match = re.search(rb'^__version__ = "([0-9A-Za-z.+_-]{1,64})"$', data[:1 << 16], re.M)
    return match.group(1).decode() if match else None


def version_key(version):
    """Dotted numbers compared as numbers: 0.10.0 is newer than 0.9.1 (1.2.3-rc1 counts as
    1.2.3)."""
    return tuple(int(re.match(r"\d*", part).group() or 0) for part in version.split("."))


def with_manager(entries, manager):
    """`entries` with the file `manager` as MANAGER_IN_RELEASE (and its folders), in order."""
    entries = [e for e in entries if e[0] != MANAGER_IN_RELEASE]
    names = {e[0] for e in entries}
    if "dist/manager" in names:
        raise ClientError("the build's dist/manager is not a folder: the manager cannot ride "
                          "along (pack --no-manager leaves it out)")
    for folder in ("dist/", "dist/manager/"):
        if folder not in names:
            entries.append((folder, DIRTYPE, None, None, ""))
    entries.append((MANAGER_IN_RELEASE, REGTYPE, manager, os.stat(manager), ""))
    return sorted(entries, key=lambda e: e[0].rstrip("/").split("/"))


def pack_release(build, kind, out, say=print, manager=None, sign=None):
    """Write OUT/V/KIND-V.tar.gz and its .sha256 from the build folder (V from its
    package.json): sorted names, owner 0, modes 0755/0644, time 0, gzip without a name or time,
    so the same build gives the same bytes. `manager`: a manager file that rides along as
    MANAGER_IN_RELEASE; `sign`: a key that signs the .sha256 (sign_file). Checks the tarball
    with the manager's own extractor before it replaces anything; returns the tarball's path
    and SHA-256."""
    build = os.path.abspath(build)
    try:
        version, package_name = read_package_json(os.path.join(build, "package.json"))
    except ReleaseError as e:
        raise ClientError(f"not a build: {e.message}") from None
    if not VERSION_RE.fullmatch(version):
        raise ClientError(f"{build}/package.json has version {version!r}, not a plain version")
    if not os.path.isdir(os.path.join(build, "dist")) or \
            os.path.islink(os.path.join(build, "dist")):
        raise ClientError(f"not a build: {build}/dist/ is missing")
    if (os.path.realpath(out) + "/").startswith(os.path.realpath(build) + "/"):
        raise ClientError(f"--out {out} is inside the build {build}: the next pack would hold "
                          "this one's tarballs", EXIT_USAGE)
    folder = os.path.join(os.path.abspath(out), version)
    target = os.path.join(folder, f"{kind}-{version}.tar.gz")
    entries = walk_build(build)
    if manager:
        entries = with_manager(entries, manager)
        with open(manager, "rb") as f:
            say(f"with manager {manager_version(f.read()) or '(no version)'} as "
                f"{MANAGER_IN_RELEASE}")
    made = not os.path.isdir(folder)
    os.makedirs(folder, exist_ok=True)
    temp = f"{target}.tmp-{os.getpid()}"
    digest = hashlib.sha256()
    started = time.monotonic()
    try:
        with open(temp, "wb") as f:
            gzip = zlib.compressobj(9, zlib.DEFLATED, 31)  # gzip: no name, mtime 0

            def put(data, last=False):
                packed = gzip.compress(data) + (gzip.flush() if last else b"")
                digest.update(packed)
                f.write(packed)

            files = 0
            for name, kind_byte, path, st, link in entries:
                if kind_byte == REGTYPE:
                    mode = 0o755 if st.st_mode & 0o111 else 0o644
                    with open(path, "rb") as src:
                        size = os.fstat(src.fileno()).st_size
                        put(tar_header(name, REGTYPE, size, mode))
                        left = size
                        while left > 0:
                            data = src.read(min(CHUNK, left))
                            if not data:
                                raise ClientError(f"{path} shrank while it was packed")
                            put(data)
                            left -= len(data)
                        put(bytes(-size % 512))
                    files += 1
                elif kind_byte == DIRTYPE:
                    put(tar_header(name, DIRTYPE, mode=0o755))
                else:
                    put(tar_header(name, SYMTYPE, mode=0o777, linkname=link))
            put(bytes(1024), last=True)  # the end marker, and the end of the gzip stream
            f.flush()
            os.fsync(f.fileno())
        say(f"packed {files} files, {len(entries) - files} folders and links of "
            f"{package_name or kind}"
            f" {version}: {os.path.getsize(temp)} bytes in {time.monotonic() - started:.1f} s")
        check_pack(temp, build, entries, version)
        say("checked: the manager's extractor unpacks exactly the build")
        for warning in pack_limits(entries, os.path.getsize(temp)):
            say(f"warning: {warning}")
        _write_file(f"{temp}.sha256",
                    f"{digest.hexdigest()}  {os.path.basename(target)}\n".encode())
        if sign:
            sign_file(f"{temp}.sha256", sign)
            say(f"signed: {target}.sha256.sig (ssh-keygen -Y sign, namespace {SIGN_NAMESPACE})")
        for suffix in (".sha256", ".sha256.sig"):  # never a new tarball beside an old checksum
            _remove(f"{target}{suffix}")
        os.replace(temp, target)
        if sign:
            os.replace(f"{temp}.sha256.sig", f"{target}.sha256.sig")
        os.replace(f"{temp}.sha256", f"{target}.sha256")
    finally:
        for suffix in ("", ".sha256", ".sha256.sig"):
            _remove(temp + suffix)
        if made and not os.listdir(folder):
            os.rmdir(folder)  # a failed pack leaves nothing behind
    return target, digest.hexdigest()


class _FileBody:
    """A file read like an HTTP answer's body, for unpack_release."""

    def __init__(self, f):
        self.f, self.headers = f, {"content-length": str(os.fstat(f.fileno()).st_size)}

    def read1(self, size):
        return self.f.read1(size)


def pack_limits(entries, tarball_size):
    """What a manager with the default limits would refuse in this release (a manager given
    larger --max-* settings takes it)."""
    option = {o.name: o for o in OPTIONS}
    sizes = [st.st_size for _name, kind, _path, st, _link in entries if kind == REGTYPE]
    found = ((option["max_members"], len(entries), 0, "{} members"),
             (option["max_file_mb"], max(sizes, default=0), 20, "a file of {} MB"),
             (option["max_unpacked_mb"], sum(sizes), 20, "{} MB unpacked"),
             (option["max_download_mb"], tarball_size, 20, "a tarball of {} MB"))
    return [f"{what.format(value >> shift)}: over {o.flag} {o.default}; managers with the "
            "default limits refuse this release"
            for o, value, shift, what in found if value > int(o.default) << shift]


def check_pack(tarball, build, entries, version):
    """Unpack `tarball` with the manager's extractor and compare it with the build: every name,
    type, link target, exec bit and byte."""
    scratch = f"{tarball}.check"
    try:
        with open(tarball, "rb") as f:
            root, _, _ = unpack_release(_FileBody(f), scratch, time.monotonic() + 3600,
                                        1 << 40, 1 << 42, 10_000_000, 1 << 40)
        tree = os.path.join(scratch, root)
        verify_release(tree, version, None, None)
        for name, kind_byte, path, st, link in entries:
            got = os.path.join(tree, name)
            if kind_byte == SYMTYPE:
                same = os.path.islink(got) and os.readlink(got) == link
            elif kind_byte == DIRTYPE:
                same = os.path.isdir(got) and not os.path.islink(got)
            else:
                same = os.path.isfile(got) and not os.path.islink(got) and \
                    bool(os.stat(got).st_mode & 0o111) == bool(st.st_mode & 0o111) and \
                    _same_bytes(got, path)
            if not same:
                raise ClientError(f"the packed release differs from the build at {name!r}")
    except ReleaseError as e:
        raise ClientError(f"the packed release does not unpack: {e.message}") from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _same_bytes(a, b):
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(CHUNK), fb.read(CHUNK)
            if x != y:
                return False
            if not x:
                return True


# ============================================================================================
# Releases: the on-disk layout that makes the switch atomic.
#
#   STATE/releases/000007-2.0.11/       complete releases, oldest first by sequence number
#   STATE/current -> releases/000007-2.0.11      the one switch: a symlink replaced atomically
#   STATE/staging/                      work in progress (downloads, extraction, deletions)
#   INSTALL/dist -> STATE/current/dist  one stable link per top-level release entry
#   INSTALL/config.json                 anything the release does not contain stays as it is
#
# A release is written completely, synced, and only then `current` is switched with one
# rename(2), so the install is the old release or the new one at every instant.
# ============================================================================================


def installed_version(settings):
    """(version, name) of the install dir's package.json; raises ManagerError if unreadable."""
    path = os.path.join(settings.install_dir, "package.json")
    try:
        return read_cached(path, read_package_json)
    except ReleaseError as e:
        raise ManagerError(f"cannot read the installed version: {e}") from None


def installed_version_or_none(settings):
    """The installed version; None when there is none to read (a first install)."""
    try:
        return installed_version(settings)[0]
    except ManagerError:
        return None


RELEASE_RE = re.compile(r"^(\d{6})-(.+)$")


class Flusher:
    """Makes what is written under `path` durable, and reports any write error.

    The directory is opened before anything is written, and every syncfs(2) goes through that
    one descriptor: the kernel reports a write error once per open file, and only errors that
    happened after it was opened, so a descriptor opened for the last sync alone could miss an
    error that an earlier flush had already collected. Between start() and stop() a thread
    flushes every INTERVAL seconds, so the data goes to disk as it comes and the sync that must
    precede the switch has little left to do. Where syncfs is missing there is no thread
    (sync(2) is system-wide) and finish() calls sync(), which reports nothing."""

    INTERVAL = 0.05

    def __init__(self, path):
        self._syncfs = _libc_function("syncfs")
        self.fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.error = None
        self._stop = threading.Event()
        self._thread = None

    def start(self):
        """Flush in the background from now on, until stop()."""
        if self._syncfs is not None and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="flusher", daemon=True)
            self._thread.start()

    def _flush(self):
        if self._syncfs is None:
            os.sync()
        elif self._syncfs(self.fd) != 0:
            import ctypes
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    def _run(self):
        while not self._stop.wait(self.INTERVAL):
            try:
                self._flush()
            except OSError as e:
                self.error = e  # for finish() to raise
                return

    def stop(self, wait=False):
        """No more background flushes (the one in progress finishes; with `wait`, first)."""
        self._stop.set()
        if wait and self._thread:
            self._thread.join()

    def finish(self, what=None):
        """The last flush; raise the first write error seen since the start (with `what`, as
        the ReleaseError "cannot write <what> to disk: <strerror>")."""
        self.stop(wait=True)
        try:
            self._flush()
        except OSError as e:
            self.error = self.error or e
        if self.error and what:
            raise ReleaseError(f"cannot write {what} to disk: {self.error.strerror}")
        if self.error:
            raise self.error

    def close(self):
        self.stop(wait=True)
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _release_modes(tree):
    """Give a release tree the modes the extractor gives: folders 0755, files 0644 or 0755
    (any execute bit), no setuid/setgid/sticky; links are left alone."""
    os.chmod(tree, 0o755)
    for folder, dirs, files in os.walk(tree):
        for name in dirs + files:
            path = os.path.join(folder, name)
            st = os.lstat(path)
            if stat.S_ISDIR(st.st_mode):
                os.chmod(path, 0o755)
            elif stat.S_ISREG(st.st_mode):
                os.chmod(path, 0o755 if st.st_mode & 0o111 else 0o644)


def _exchange(a, b):
    """Atomically swap two paths with renameat2(RENAME_EXCHANGE); False if unsupported here."""
    renameat2 = _libc_function("renameat2")
    if renameat2 is None:
        return False
    import ctypes
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: the filesystem cannot exchange
        return False
    raise OSError(err, os.strerror(err), b)


class Releases:
    """The kept releases, the `current` switch and the install dir's links into it."""

    def __init__(self, install_dir, state_dir):
        self.install_dir = install_dir
        self.state_dir = state_dir
        self.releases_dir = os.path.join(state_dir, "releases")
        self.current_link = os.path.join(state_dir, "current")
        self.staging_dir = os.path.join(state_dir, "staging")

    def prepare(self):
        """Make the layout's folders. The service may run as its own user: the state dir,
        releases/ and every kept release must be enterable and readable by it (0755)."""
        for path in (self.install_dir, self.state_dir, self.releases_dir, self.staging_dir):
            os.makedirs(path, 0o755, exist_ok=True)
        for path in [self.state_dir, self.releases_dir] + [self.path(i) for i in self.ids()]:
            mode = stat.S_IMODE(os.lstat(path).st_mode)
            if mode & 0o555 != 0o555:  # add read and search for everyone, never remove a bit
                os.chmod(path, mode | 0o555)

    # --- reading the layout
    def ids(self):
        """Kept release ids, oldest first."""
        try:
            names = os.listdir(self.releases_dir)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if RELEASE_RE.match(n))

    def current_id(self):
        try:
            return os.path.basename(os.readlink(self.current_link))
        except OSError:
            return None

    def previous_id(self):
        """The newest kept release older than the current one, or None."""
        current = self.current_id()
        return max((i for i in self.ids() if current is None or i < current), default=None)

    @staticmethod
    def version_of(release_id):
        match = RELEASE_RE.match(release_id or "")
        return match.group(2) if match else None

    def path(self, release_id):
        return os.path.join(self.releases_dir, release_id)

    def _link_target(self, entry):
        return os.path.join(self.current_link, entry)

    def is_ours(self, entry):
        path = os.path.join(self.install_dir, entry)
        return os.path.islink(path) and os.readlink(path) == self._link_target(entry)

    # --- changing it
    def new_staging(self, label):
        path = os.path.join(self.staging_dir, f"{label}-{os.getpid()}-{time.monotonic_ns()}")
        os.mkdir(path, 0o700)
        return path

    def add(self, tree, version):
        """Move a complete, synced release tree into releases/; return its id."""
        last = max((int(RELEASE_RE.match(i).group(1)) for i in self.ids()), default=0)
        release_id = f"{last + 1:06d}-{version}"
        os.rename(tree, self.path(release_id))
        _fsync_dir(self.releases_dir)
        return release_id

    def switch(self, release_id):
        """Point `current` at release_id with one atomic rename, durably."""
        tmp = self.current_link + ".tmp"
        _remove(tmp)
        os.symlink(os.path.join("releases", release_id), tmp)
        os.replace(tmp, self.current_link)
        _fsync_dir(self.state_dir)

    def discard(self, release_id, defer=False):
        """Remove a kept release: renamed out of releases/ first, so a crash never leaves a
        half-deleted release that could be chosen for a rollback. With defer, return the renamed
        folder for the caller to delete later (staging/ is emptied at start anyway)."""
        trash = os.path.join(self.staging_dir, f"trash-{release_id}-{time.monotonic_ns()}")
        os.rename(self.path(release_id), trash)
        if defer:
            return trash
        shutil.rmtree(trash, ignore_errors=True)
        return None

    def discard_newer(self):
        """Remove releases newer than `current`: left by a fetch or a rollback interrupted
        before it was recorded (a finished job never leaves one)."""
        current = self.current_id() or ""
        for release_id in self.ids():
            if release_id > current:
                self.discard(release_id)

    def prune(self, keep, defer=False):
        """Keep the current release and the `keep` newest older ones; return deferred trash."""
        current = self.current_id()
        older = [i for i in self.ids() if current is None or i < current]
        return [self.discard(i, defer) for i in (older[:-keep] if keep else older)]

    def entries_for(self, tree):
        """The install-dir entries to link for the release at `tree`: its top-level names, and
        those of the current release (a name the new release drops must not stay a real file)."""
        names = set(os.listdir(tree))
        current = self.current_id()
        if current and os.path.isdir(self.path(current)):
            names |= set(os.listdir(self.path(current)))
        return sorted(names)

    def foreign(self, entries):
        """Entries that exist in the install dir but are not our links: an install made before
        the manager, or changed by hand."""
        return [e for e in entries if os.path.lexists(os.path.join(self.install_dir, e))
                and not self.is_ours(e)]

    def keep_live_install(self, entries):
        """Copy the live content of `entries` into a new kept release; return its id. Like an
        extracted release, it is owned by root and readable by all: folders 0755, files 0644,
        or 0755 where the live file had an execute bit."""
        tree = self.new_staging("snapshot")
        flusher = Flusher(tree)
        try:
            for entry in entries:  # each live entry (links kept as links) into tree/
                live = os.path.join(self.install_dir, entry)
                if not os.path.exists(live):
                    continue
                if os.path.isdir(live):
                    shutil.copytree(live, os.path.join(tree, entry), symlinks=True)
                else:
                    shutil.copy2(live, os.path.join(tree, entry))
            _release_modes(tree)
            flusher.finish("the live install's copy")
        finally:
            flusher.close()
        try:
            version, _name = read_package_json(os.path.join(tree, "package.json"))
            version = parse_version(version)
        except (ReleaseError, InvalidInput):  # a live install of any version is kept
            version = "unknown"
        return self.add(tree, version)

    def link_entries(self, entries):
        """Make INSTALL/<entry> our link for each entry. A real entry is exchanged for its link
        atomically; the caller has made `current` hold the same content first (snapshot)."""
        for entry in entries:
            if not self.is_ours(entry):
                self._link_entry(entry)
        _fsync_dir(self.install_dir)

    def _link_entry(self, entry):
        live = os.path.join(self.install_dir, entry)
        new = os.path.join(self.install_dir, f".{entry}.bam-new")
        old = os.path.join(self.install_dir, f".{entry}.bam-old")
        _remove(new)
        os.symlink(self._link_target(entry), new)
        if not os.path.lexists(live):
            os.rename(new, live)
        elif _exchange(new, live):
            failpoint("link-exchanged")
            _remove(new)  # now holds the displaced real entry; the snapshot has its content
        else:
            # No RENAME_EXCHANGE on this filesystem: two renames; recover() puts `old` back if
            # we die between them.
            os.rename(live, old)
            os.rename(new, live)
            _remove(old)

    def recover(self):
        """Undo what an interrupted run left: staging contents, half-made links, a stray tmp."""
        _remove(self.current_link + ".tmp")
        for name in os.listdir(self.staging_dir):
            _remove(os.path.join(self.staging_dir, name))
        for name in os.listdir(self.install_dir):
            match = re.match(r"^\.(.+)\.bam-(new|old)$", name)
            if not match:
                continue
            entry = os.path.join(self.install_dir, match.group(1))
            if not os.path.lexists(entry):
                old = os.path.join(self.install_dir, f".{match.group(1)}.bam-old")
                source = old if os.path.lexists(old) else os.path.join(self.install_dir, name)
                os.rename(source, entry)
                log.warning("restored %s after an interrupted swap", entry)
            for suffix in ("new", "old"):
                _remove(os.path.join(self.install_dir, f".{match.group(1)}.bam-{suffix}"))


# ============================================================================================
# The update job: one at a time, in a background thread. Its record (STATE/update.json) is
# saved at every step, so GET /update tells the truth after a manager restart, and a manager
# that died mid-job finishes the job at start, from the phase the record names (RECOVERY).
#
#   idle -> downloading -> verifying -> swapping -> restarting -> checking -> succeeded
#           (a rollback starts at swapping)
#   then, from any phase: failed (the host is as it was) or rolled_back (the new release was
#   switched in, proved unhealthy, and the previous one is back)
# ============================================================================================


IDLE = "idle"
DOWNLOADING = "downloading"  # the .sha256, then download, gunzip and unpack in one pass
VERIFYING = "verifying"      # checksum, the release's version and layout, its data on disk
SWAPPING = "swapping"        # the release joins releases/ and the install gets its links
RESTARTING = "restarting"    # `current` switched to the release; the service restarted
CHECKING = "checking"        # the health gate
SUCCEEDED, FAILED, ROLLED_BACK = "succeeded", "failed", "rolled_back"
WORKING_STATES = (DOWNLOADING, VERIFYING, SWAPPING, RESTARTING, CHECKING)
FINAL_STATES = (SUCCEEDED, FAILED, ROLLED_BACK)
# What start-up recovery does for a job that was in each phase when the manager died. Until
# `current` is switched (restarting's first act) the install serves what it served before, at
# most through links into a copy of the same files: nothing to undo. From then on the previous
# release is put back and restarted (a crash in the instant between recording `restarting` and
# the switch restarts the unchanged release).
NOTHING_CHANGED, RESTORE = "nothing changed", "restore the previous release"
RECOVERY = {DOWNLOADING: NOTHING_CHANGED, VERIFYING: NOTHING_CHANGED, SWAPPING: NOTHING_CHANGED,
            RESTARTING: RESTORE, CHECKING: RESTORE}
SUMMARY_FIELDS = ("action", "state", "version", "from_version", "error", "step", "started_at",
                  "finished_at", "bytes", "total", "files")


class JobRecord:
    """The persisted record of a background job: its state, current step, a log of steps with
    elapsed seconds, and the fields the job adds. Saved with write-temp + rename, so a killed
    manager always leaves a whole record; fsynced (durable across a power cut) only where
    recovery depends on it. Thread-safe."""

    LOG_LIMIT = 100

    def __init__(self, state_dir, kind, working_states):
        self.path = os.path.join(state_dir, f"{kind}.json")
        self.kind = kind  # "update" or "rollout": the record's name in messages
        self.working_states = working_states
        self.lock = threading.Lock()
        self.fields = {"action": None, "state": IDLE, "version": None, "error": None, "log": []}
        self._started = time.monotonic()
        self._last_save = 0.0

    def load(self):
        """Read the record a previous manager left (an unreadable one is ignored)."""
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
            if isinstance(data, dict) and "state" in data:
                self.fields = data
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as e:
            log.warning("ignoring unreadable job record %s: %s", self.path, e)

    def get(self, key, default=None):
        return self.fields.get(key, default)

    @property
    def state(self):
        return self.fields.get("state")

    def working(self):
        return self.state in self.working_states

    def begin(self, fields):
        """Start a new job with these fields (state included), unless one is working (Busy).
        Raises ManagerError, keeping the old record, if it cannot be saved."""
        with self.lock:
            if self.working():
                raise Busy(f"an {self.fields.get('action')} to version "
                           f"{self.fields.get('version')} is already running ({self.state})")
            previous = self.fields
            self.fields = dict(fields, error=None, step=None, started_at=utc_now(),
                               finished_at=None, log=[])
            self._started = time.monotonic()
            try:
                self._save()
            except OSError as e:
                self.fields = previous
                raise ManagerError(f"cannot write the {self.kind} record {self.path}: "
                                   f"{e.strerror}") from None

    def set(self, state=None, message=None, level=logging.INFO, durable=False, recount=None,
            **fields):
        """Change the state and fields; a message becomes the step and a log entry. With
        durable, a failed save raises OSError (the caller must not go on); otherwise it is
        logged and the record in memory stays true. `recount`: a list field whose entries'
        states are counted into `counts`, in the same locked step as the save."""
        with self.lock:
            if state:
                self.fields["state"] = state
            self.fields.update(fields)
            if recount:
                self.fields["counts"] = dict(collections.Counter(
                    entry["state"] for entry in self.fields.get(recount) or ()))
            if message:
                self.fields["step"] = message
                self.fields["log"] = (self.fields.get("log") or [])[-(self.LOG_LIMIT - 1):] + [
                    {"at": utc_now(), "elapsed": round(time.monotonic() - self._started, 3),
                     "state": self.fields["state"], "message": message}]
            if not self.working() and not self.fields.get("finished_at"):
                self.fields["finished_at"] = utc_now()
            try:
                self._save(durable)
            except OSError as e:
                if durable:
                    raise
                log.error("cannot write %s: %s", self.path, e)
        if message:
            action, state = self.fields.get("action"), self.fields["state"]
            log.log(level, "%s %s: %s", action, state, message)
            sd_notify(f"STATUS={action} {state}: {message}")

    def update_entry(self, entry, **fields):
        """Change one entry of a list in the record (a rollout's agents), in memory; the next
        set() saves it."""
        with self.lock:
            entry.update(fields)

    def count(self, **counters):
        """Progress counters: in memory at once, saved at most once a second."""
        with self.lock:
            self.fields.update(counters)
            if time.monotonic() - self._last_save > 1.0:
                try:
                    self._save()
                except OSError as e:
                    log.error("cannot write %s: %s", self.path, e)

    def view(self, keys=None, wait=True):
        """A copy of the record, or of the given keys only (without `wait`, WouldWait if the
        record is being changed or saved)."""
        if not self.lock.acquire(blocking=wait):
            raise WouldWait()
        try:
            fields = json.loads(json.dumps(self.fields))
        finally:
            self.lock.release()
        return fields if keys is None else {k: fields.get(k) for k in keys}

    def _save(self, durable=False):
        _write_file(self.path, json.dumps(self.fields, indent=1).encode(), durable=durable)
        self._last_save = time.monotonic()


class Unhealthy(ManagerError):
    """The restarted service did not prove healthy; the message says why. (The update job
    catches it to roll back: never caught as a plain ManagerError on that path.)"""


class Updater:
    """Runs updates and rollbacks, one at a time, and keeps their JobRecord."""

    def __init__(self, settings, systemd, releases):
        self.settings = settings
        self.systemd = systemd
        self.releases = releases
        self.job = JobRecord(settings.state_dir, "update", WORKING_STATES)
        self.manager = ManagerUpdate(settings, releases)
        self.manager.signed, self.manager.busy = self.signed, self.busy

    def view(self, summary=False, wait=True):
        return self.job.view(SUMMARY_FIELDS if summary else None, wait)

    def busy(self):
        return self.job.working()

    # --- starting jobs (called by the API)
    def start_update(self, version, then=None, rollout=None):
        """Start an update; `then(state)` runs in the job's thread once it has ended.
        `rollout`: the id of the hub's rollout that sent it, kept in the record."""
        return self._start("update", version, None, then, rollout)

    def start_rollback(self):
        target = self.releases.previous_id()
        if target is None:
            raise Busy("no previous release to roll back to")
        return self._start("rollback", self.releases.version_of(target), target)

    def _start(self, action, version, target, then=None, rollout=None):
        from_version = installed_version_or_none(self.settings)
        self.job.begin({
            "action": action, "state": DOWNLOADING if action == "update" else SWAPPING,
            "version": version, "from_version": from_version, "bytes": 0, "total": None,
            "files": 0, "target": target, "fallback": self.releases.current_id(),
            "rollout": rollout})
        threading.Thread(target=self._run, args=(then,), name=action, daemon=True).start()
        return self.view(summary=True)

    def _run(self, then=None):
        staging = None
        try:
            if self.job.get("action") == "update":
                staging = self.releases.new_staging("release")
                self._install(tree=self._fetch(self.job.get("version"), staging))
            else:
                self._install(target=self.job.get("target"))
        except ReleaseError as e:
            self.job.set(FAILED, f"{e}; nothing was changed", logging.ERROR, error=str(e))
        except Unhealthy as e:
            self._roll_back(str(e))
        except Exception as e:  # an unexpected fault must still leave a complete install
            log.exception("%s failed unexpectedly", self.job.get("action"))
            try:
                self.releases.recover()
                self._finish_interrupted(f"internal error: {e}")
                self.releases.discard_newer()
            except Exception as again:  # the record never stays working with no job
                log.exception("recovery after that failed too")
                self.job.set(FAILED, f"internal error: {e}; then: {describe(again)}",
                             logging.ERROR, error=f"internal error: {e}")
        finally:
            if staging:
                shutil.rmtree(staging, ignore_errors=True)
            if then is not None:
                then(self.job.state)
            self.manager.offer()  # between jobs: the manager's own update, if due

    # --- the phases
    def _fetch(self, version, staging):
        """downloading and verifying: the release unpacked in staging/, checked and on disk;
        returns its tree's path. It gets its release id only when it is added, so ids follow
        the install order."""
        s = self.settings
        url = s.nas_url.replace("{version}", version)
        deadline = time.monotonic() + s.download_timeout
        per_op = max(1.0, min(30.0, s.download_timeout))
        self.job.set(DOWNLOADING, f"downloading {url}")
        expected = self._checksum(url, per_op, deadline, staging)
        flusher = Flusher(staging)  # before anything is written: see Flusher
        try:
            try:
                response = open_url(url, per_op, deadline)
            except NoSuchRelease:
                raise NoSuchRelease(f"the NAS has no release {version}: {url} answered 404") \
                    from None
            with response:
                root, download, files = unpack_release(
                    response, os.path.join(staging, "tree"), deadline=deadline,
                    max_download=s.max_download_mb << 20, max_unpacked=s.max_unpacked_mb << 20,
                    max_members=s.max_members, max_file=s.max_file_mb << 20,
                    on_bytes=lambda done, total: self.job.count(bytes=done, total=total),
                    on_files=lambda files, _written: self.job.count(files=files),
                    flusher=flusher)
            self.job.set(VERIFYING, f"verifying {download.count} bytes, {files} files")
            tree = os.path.join(staging, "tree", root)
            digest = download.sha256.hexdigest()
            verify_release(tree, version, digest, expected)
            # one sync for the whole tree is far cheaper than a fsync per file
            flusher.finish("the release")
            self.job.set(message=f"verified; {files} files on disk", sha256=digest)
            return tree
        finally:
            flusher.close()

    def _checksum(self, url, timeout, deadline, scratch):
        """The digest the .sha256 names (None if there is none and none is required). With
        --release-signers, the .sha256 must carry a valid .sha256.sig by an allowed key."""
        signers = self.settings.release_signers
        try:
            with open_url(url + ".sha256", timeout, deadline) as response:
                sums = response.read(4096)
        except NoSuchRelease:
            if self.settings.require_checksum or signers:
                raise ReleaseError(f"no checksum file {url}.sha256, and --"
                                   f"{'release-signers' if signers else 'require-checksum'} "
                                   "is set") from None
            return None
        if signers:
            try:
                with open_url(url + ".sha256.sig", timeout, deadline) as response:
                    signature = response.read(16384)
            except NoSuchRelease:
                raise ReleaseError(f"no signature {url}.sha256.sig, and --release-signers is "
                                   "set: only signed releases are installed") from None
            principal, key = check_signature(sums, signature, signers, scratch)
            self.job.set(message=f"signed by {principal} ({key})",
                         signed={"principal": principal, "key": key})
        return parse_checksum(sums.decode("ascii", "replace"))

    def signed(self):
        """Whether the current release was installed by an update whose signature held."""
        current = self.releases.current_id()
        return bool(self.job.get("signed")) and self.job.get("action") == "update" and \
            current is not None and self.releases.version_of(current) == self.job.get("version")

    def _install(self, tree=None, target=None):
        """swapping, restarting, checking: add a fetched tree (or take kept release `target`),
        switch to it, restart, check; raises Unhealthy if it does not hold."""
        releases = self.releases
        version = self.job.get("version")
        try:
            self.job.set(SWAPPING, f"adding version {version}", durable=True)
        except OSError as e:
            raise ReleaseError(f"cannot write the update record: {e.strerror}") from None
        failpoint("swap-start")
        entries = releases.entries_for(tree or releases.path(target))
        if releases.foreign(entries):
            # First update of an install made without the manager: keep the live files as a
            # release and serve them through the links, then go on like any other update.
            kept = releases.keep_live_install(entries)
            failpoint("snapshot-added")
            self.job.set(message=f"kept the live install as release {kept}", fallback=kept,
                         durable=True)
            releases.switch(kept)
        if tree:
            target = releases.add(tree, version)
            failpoint("release-added")
            self.job.set(message=f"added release {target}", target=target)
        releases.link_entries(entries)
        self.job.set(RESTARTING, f"switching to release {target}; restarting "
                     f"{self.systemd.unit}", durable=True)
        releases.switch(target)
        failpoint("switched")
        try:
            self.systemd.control("restart")
        except ManagerError as e:
            raise Unhealthy(e.message) from None
        failpoint("restarted")
        settle = self.settings.settle
        self.job.set(CHECKING, f"checking that {self.systemd.unit} stays active for {settle:g} s")
        self.check_health(settle)
        self._succeed()

    def _succeed(self):
        """The commit point (saved durably), then the clean-up: the release a rollback left is
        deleted (so the next rollback goes further back), and old releases beyond
        --keep-backups. A crash during the clean-up leaves only extra releases, which the next
        start deletes (recover())."""
        releases = self.releases
        left = self.job.get("fallback")
        self.job.set(SUCCEEDED, f"version {self.job.get('version')} is running", error=None,
                     durable=True, manager_update=self.manager.pending()[0])
        failpoint("committed")
        trash = []
        if self.job.get("action") == "rollback" and left and left in releases.ids() \
                and left != releases.current_id():
            trash.append(releases.discard(left, defer=True))
        trash += releases.prune(self.settings.keep_backups, defer=True)
        for path in trash:  # deleting old files is not part of the update's latency
            shutil.rmtree(path, ignore_errors=True)

    def check_health(self, settle):
        """Raise Unhealthy unless the unit stays active with the same main PID for `settle`
        seconds and the health URL (if any) answers 2xx."""
        first = props = self.systemd.show()
        deadline = time.monotonic() + settle
        while True:
            if props.get("ActiveState") != "active":
                raise Unhealthy(f"{self.systemd.unit} is {props.get('ActiveState')} "
                                f"({props.get('SubState')}): {self._last_lines()}")
            if props.get("MainPID") != first.get("MainPID") or \
                    props.get("NRestarts") != first.get("NRestarts"):
                raise Unhealthy(f"{self.systemd.unit} restarted during the settle time: "
                                f"{self._last_lines()}")
            left = deadline - time.monotonic()
            if left <= 0:
                break
            time.sleep(min(0.5, left))
            props = self.systemd.show()
        if self.settings.health_url:
            self._check_url(self.settings.health_url, settle + 5.0)

    def _check_url(self, url, within):
        deadline = time.monotonic() + within
        error = None
        while time.monotonic() < deadline:
            try:
                status = health_check(url, timeout=5, deadline=deadline)
                if 200 <= status < 300:
                    return
                error = f"HTTP {status}"
            except HttpClientError as e:
                # A last try cut off by the deadline does not hide an earlier answer's status.
                if error is None or time.monotonic() < deadline:
                    error = e.message
            time.sleep(0.5)
        raise Unhealthy(f"health URL {url} did not answer 2xx within {within:g} s: {error}")

    def _last_lines(self, lines=5):
        """The unit's last journal lines for a failure's text: each cut to 500 characters,
        about 2 KB in all (a crash printing a minified bundle's 100 KB line must not make
        the record too big for the hub to read)."""
        try:
            text = self.systemd.logs(lines, output="cat")
        except ManagerError as e:
            return f"(no logs: {_text(e.message)})"
        return _text(" | ".join(_text(line.strip()) for line in text.splitlines()[-lines:]),
                     2000) or "(no log lines)"

    def _roll_back(self, reason):
        """Put the fallback release back and restart it; record why."""
        target, fallback = self.job.get("target"), self.job.get("fallback")
        self.job.set(message=f"unhealthy: {reason}", level=logging.ERROR)
        if not fallback or fallback not in self.releases.ids():
            self.job.set(FAILED, "no previous release to roll back to; the new release stays",
                         logging.ERROR, error=reason)
            return
        try:
            self.releases.switch(fallback)
            failpoint("rollback-switched")
            if self.job.get("action") == "update" and target and target in self.releases.ids():
                self.releases.discard(target)
            self.job.set(message=f"restarting release {fallback}")
            self.systemd.control("restart")
            self.check_health(min(self.settings.settle, 5.0))
            self.job.set(ROLLED_BACK, f"rolled back to release {fallback}", logging.WARNING,
                         error=reason)
        except (ManagerError, OSError) as e:  # the record stays truthful
            problem = describe(e)
            self.job.set(ROLLED_BACK, f"rolled back to release {fallback}, but it is not "
                         f"healthy either: {problem}", logging.ERROR,
                         error=f"{reason}; after the rollback: {problem}")

    # --- start-up recovery
    def recover(self):
        """Finish what a crash interrupted: clean staging and half-made links, then finish the
        job by RECOVERY, and do the clean-up a job may not have finished: delete releases newer
        than `current`, and those beyond --keep-backups."""
        self.releases.prepare()
        self.job.load()
        self.releases.recover()
        try:
            if self.job.state not in (IDLE,) + FINAL_STATES:
                self._finish_interrupted(f"the manager stopped during '{self.job.state}'")
        finally:
            self.releases.discard_newer()
            self.releases.prune(self.settings.keep_backups)

    def _finish_interrupted(self, why):
        """End a job that stopped in the middle of its phase, as RECOVERY says for it."""
        if RECOVERY.get(self.job.state, NOTHING_CHANGED) == NOTHING_CHANGED:
            self.job.set(FAILED, f"{why}; nothing was changed", logging.WARNING, error=why)
            return
        fallback = self.job.get("fallback")
        if not fallback or fallback not in self.releases.ids():
            self.job.set(FAILED, f"{why}; there was no previous release to restore",
                         logging.ERROR, error=why)
            return
        if self.releases.current_id() != fallback:
            self.releases.switch(fallback)
        try:
            self.systemd.control("restart")
        except ManagerError as e:
            why += f"; restarting the service failed: {e.message}"
        self.job.set(ROLLED_BACK, f"{why}; release {fallback} was restored", logging.WARNING,
                     error=why)


# --- the manager's own update: a release may carry dist/manager/backend_ai_manager.py --------
# Each version is kept in STATE/manager/<version>/, `current` links the one to run, and
# STATE/manager/manager.json records the last good version, the one before it, the version on
# trial, the failed versions (never tried again by themselves) and the last attempt. A newer
# manager is self-tested, kept, then handed this process in place (exec: same PID, the listening
# socket passed on); it is on trial for --manager-trial seconds. The unit's file is the fixed
# start point: each start settles a trial that did not end (that version failed) and hands over
# to the newest good of itself and `current` (start_point()).
SELF_TEST_TIMEOUT = 10
HANDOVER_ENV, LISTEN_FD_ENV, LOCK_FD_ENV = (
    "BACKEND_AI_HANDOVER", "BACKEND_AI_LISTEN_FD", "BACKEND_AI_LOCK_FD")
TESTING, HANDING_OVER, EXECUTING, ON_TRIAL, GOOD, REFUSED, REVERTED, INTERRUPTED = (
    "testing", "handing over", "executing", "trial", "good", "refused", "reverted",
    "interrupted")
HANDOVER_LIMIT = 60  # seconds from the exec to serving, or SIGALRM ends the new manager


class ManagerUpdate:
    """The store, the record and the self-update itself (see the comment above). The record is
    changed under one lock (the self-update, the trial's timer and a stop may overlap)."""

    def __init__(self, settings, releases):
        self.settings, self.releases = settings, releases
        self.dir = os.path.join(settings.state_dir, "manager")
        self.path = os.path.join(self.dir, "manager.json")
        self.current = os.path.join(self.dir, "current")
        self.record = {"failed": {}}
        self.record_lock = threading.RLock()
        self.lock = threading.Lock()  # checking that no job runs and starting one: one step
        self.active = self.closing = False
        self.busy = lambda: False  # the Updater's: a job runs
        self.blockers = []  # more callables saying "a job runs" (the hub's rollout)
        self.requests = lambda: 0  # serve()'s: requests in progress (a hand-over waits for them)
        self.signed = lambda: False  # the Updater's: was the current release's signature checked
        self.hand_over = None  # serve()'s: drain the server and exec a file; never returns

    # --- the store and its record
    def load(self):
        try:
            with open(self.path, "rb") as f:
                self.record = json.loads(f.read())
        except FileNotFoundError:
            self.record = {}
        except (OSError, ValueError) as e:  # written atomically: only a hand could break it
            log.error("cannot read the manager record %s (%s): starting a new one", self.path, e)
            self.record = {}
        self.record.setdefault("failed", {})
        return self.record

    def save(self, **fields):
        with self.record_lock:
            self.record.update(fields)
            os.makedirs(self.dir, 0o755, exist_ok=True)
            _write_file(self.path, json.dumps(self.record, indent=1).encode())

    def last(self, **fields):
        """The record's self_update (the last attempt) with `fields` changed."""
        return dict(self.record.get("self_update") or {}, **fields)

    def file(self, version):
        return os.path.join(self.dir, version, "backend_ai_manager.py")

    def keep(self, version, data):
        os.makedirs(os.path.dirname(self.file(version)), 0o755, exist_ok=True)
        _write_file(self.file(version), data, 0o755)
        _fsync_dir(self.dir)

    def point(self, version):
        """`current` -> version, atomically (None: no link, run the unit's file)."""
        temp = self.current + ".new"
        _remove(temp)
        if version is None:
            _remove(self.current)
        else:
            os.symlink(version, temp)
            os.replace(temp, self.current)
        _fsync_dir(self.dir)

    def point_to_good(self):
        good = self.record.get("good")
        self.point(good if good and os.path.isfile(self.file(good)) else None)

    def view(self):
        trial = self.record.get("trial") or {}
        return {"version": __version__, "role": self.settings.role,
                "state": ON_TRIAL if trial.get("version") == __version__ else GOOD,
                "previous": self.record.get("previous"),
                "failed": dict(self.record["failed"]), "self_update": self.record.get("self_update"),
                "updates": "on" if self.settings.manager_updates else "off",
                "release_signers": self.settings.release_signers or None}

    # --- at start
    def start_point(self, handed_over):
        """Settle the record at start; returns the kept file to hand over to, or None to run
        this one. `handed_over`: this process was exec'd by a manager ("trial": a
        self-update's; "start": the start point's)."""
        record = self.load()
        trial, starting = record.get("trial"), record.get("starting")
        if handed_over == "trial" and trial and trial.get("version") == __version__:
            return None
        if trial and trial.get("phase") == HANDING_OVER:  # it never ran: try it again
            self.point_to_good()
            self.save(trial=None, self_update=self.last(
                state=INTERRUPTED, error="the old manager stopped before the hand-over"))
        elif trial:  # the manager on trial did not last: the last good one comes back
            reason = ("it did not start serving (it failed at start or missed READY)"
                      if trial.get("phase") == EXECUTING else
                      f"stopped during its {trial.get('trial', 0):g} s trial (it began serving "
                      f"{time.time() - trial.get('serving', 0):.0f} s before this start)")
            self._failed(trial["version"], reason, REVERTED, trial=None)
        elif starting and not handed_over:  # the kept manager handed over to at start died
            self._failed(starting, "it stopped before it served, started as the kept manager",
                         REVERTED, starting=None)
        stored = None
        if not handed_over and self.settings.manager_updates:
            try:
                stored = os.readlink(self.current)
            except OSError:
                pass
        if stored and stored not in record["failed"] and os.path.isfile(self.file(stored)) \
                and version_key(stored) > version_key(__version__):
            self.save(starting=stored)
            return self.file(stored)
        if record.get("good") != __version__:  # a first start, or a newer file copied by hand
            self.save(good=__version__, previous=record.get("good"))
        return None

    def _failed(self, version, reason, state, **fields):
        log.error("manager %s failed: %s; back to %s", version, reason,
                  self.record.get("good") or __version__)
        with self.record_lock:
            self.record["failed"][version] = reason
            self.point_to_good()
            self.save(self_update=self.last(state=state, error=reason), **fields)

    def serving(self):
        """Called once this manager serves: a manager on trial starts its clock."""
        signal.alarm(0)  # the hand-over's limit for getting here (see serve())
        with self.record_lock:
            trial = self.record.get("trial")
            if self.record.get("starting") == __version__:
                self.save(starting=None)
            if trial and trial.get("version") == __version__:
                self.save(trial=dict(trial, phase=ON_TRIAL, serving=time.time(),
                                     trial=self.settings.manager_trial),
                          self_update=self.last(state=ON_TRIAL))
                timer = threading.Timer(self.settings.manager_trial, self._passed)
                timer.daemon = True
                timer.start()

    def executing(self):
        """The hand-over's last record before exec: from now on a stop is the new version's."""
        self.save(trial=dict(self.record["trial"], phase=EXECUTING))

    def stopped(self):
        """A clean stop during a hand-over or a trial is not the new version's failure: it is
        undone, the last good manager runs at the next start, and that one tries again."""
        with self.record_lock:
            self.closing = True  # no hand-over from now on
            trial = self.record.get("trial")
            if trial and __version__ in (trial.get("version"), trial.get("from")):
                self.point_to_good()
                self.save(trial=None, self_update=self.last(
                    state=INTERRUPTED, error="the manager was stopped during the hand-over or "
                    "the trial; tried again at the next start"))

    def _passed(self):
        with self.record_lock:
            trial = self.record.get("trial")
            if self.closing or not trial or trial.get("version") != __version__:
                return
            self.save(good=__version__, previous=trial.get("from"), trial=None,
                      self_update=self.last(state=GOOD))
        for name in os.listdir(self.dir):  # keep this version and the previous one
            path = os.path.join(self.dir, name)
            if name not in (__version__, trial.get("from")) and os.path.isdir(path) and \
                    not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
        log.info("manager %s passed its trial of %g s", __version__, self.settings.manager_trial)
        self.offer()  # a job may have ended during the trial

    # --- between jobs
    def pending(self):
        """The newer manager the current release carries, if this one would try it."""
        try:
            with open(os.path.join(self.releases.current_link, MANAGER_IN_RELEASE), "rb") as f:
                data = f.read()
        except OSError:
            return None, None
        version = manager_version(data)
        if self.settings.release_signers and not self.signed():
            return None, None  # with signers, a manager comes only from a checked release
        if not self.settings.manager_updates or version is None or \
                version_key(version) <= version_key(__version__) or \
                version in self.record["failed"]:
            return None, None
        return version, data

    def check_idle(self):
        """Raises Busy while the manager updates itself (call with `lock` held)."""
        if self.active:
            raise Busy("the manager is updating itself; try again in a few seconds")

    def offer(self):
        """Between jobs: start the self-update if the current release carries a newer manager,
        no job (busy(), blockers) runs, and this manager is not on trial itself."""
        if self.hand_over is None or self.record.get("trial") or self.pending()[0] is None:
            return
        with self.lock:
            if self.active or self.busy() or any(blocked() for blocked in self.blockers):
                return  # the end of that job offers again
            if self.requests():
                timer = threading.Timer(0.5, self.offer)  # soon: a request ends in seconds
                timer.daemon = True
                return timer.start()
            self.active = True
        threading.Thread(target=self._update, name="self-update", daemon=True).start()

    def _update(self):
        version = None
        try:
            version, data = self.pending()
            if version is not None:
                self._attempt(version, data)
        except Exception as e:  # not the new version's fault: tried again after the next job
            log.exception("manager self-update failed")
            self.save(self_update=self.last(state=INTERRUPTED, error=f"internal error: "
                                            f"{describe(e)}; tried again after the next job"))
        finally:
            self.active = False

    def _attempt(self, version, data):
        self.save(self_update={"version": version, "from": __version__, "state": TESTING,
                               "error": None, "at": utc_now()})
        with open(__file__, "rb") as f:
            mine = f.read()
        if manager_version(mine) == __version__ and not os.path.isfile(self.file(__version__)):
            self.keep(__version__, mine)  # the previous version, kept
        self.keep(version, data)  # the self-test runs the very bytes that will run
        failpoint("manager-stored")
        log.info("the current release carries manager %s: self-test", version)
        problem = self.self_test(self.file(version), version)
        if problem:
            shutil.rmtree(os.path.dirname(self.file(version)), ignore_errors=True)
            reason = f"its self-test failed: {problem}"
            log.error("manager %s refused: %s; %s keeps running", version, reason, __version__)
            self.record["failed"][version] = reason
            return self.save(self_update=self.last(state=REFUSED, error=reason))
        failpoint("manager-tested")
        with self.record_lock:
            if self.closing:
                return
            self.save(trial={"version": version, "from": __version__, "phase": HANDING_OVER,
                             "since": utc_now()}, self_update=self.last(state=HANDING_OVER))
            self.point(version)
        log.info("manager %s self-tested and kept: handing over to it", version)
        self.hand_over(self.file(version))

    def self_test(self, path, version):
        """Run `python3 path self-test` with this manager's settings; the problem, or None."""
        argv = [sys.executable, path, "self-test"]
        for option in OPTIONS:  # the same settings, as flags (its environment is COMMAND_ENV)
            text, origin = self.settings.sources.get(option.name, ("", "default"))
            if origin != "default" and (option.parse is not _bool or _bool(text)):
                argv.append(option.flag if option.parse is _bool else f"{option.flag}={text}")
        result = run_command(argv, SELF_TEST_TIMEOUT)
        if result.timed_out:
            return f"it did not finish within {SELF_TEST_TIMEOUT} s"
        if result.code != 0:  # the last line of a traceback says what went wrong
            said = (result.err.strip() or result.out.strip()).splitlines()
            return f"exit status {result.code}" + (f": {_text(said[-1], 300)}" if said else "")
        try:
            said = json.loads(result.out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            return f"it printed {_text(result.out, 200)!r}, not its version"
        said = said.get("version") if isinstance(said, dict) else said
        return None if said == version else f"it says it is {_text(said, 64)}, not {version}"


# ============================================================================================
# Fleet: the hub's view of its agents (GET /agents) and the rollout of a release to them. The
# hub talks to each agent's manager with AgentCall (see the wire section): answers are checked
# field by field (an agent is untrusted input), and the agent token goes to agents only.
# ============================================================================================


def agent_status(call):
    """GET /agents' entry for one agent's GET /status call, every field checked."""
    entry = {"agent": call.agent, "reachable": call.answered, "running": None,
             "active_state": None, "since": None, "version": None, "update": None,
             "manager": None, "rtt_ms": call.rtt_ms, "error": call.error}
    if call.status is None:
        return entry
    payload = call.payload
    if call.status != 200:
        entry["error"] = f"HTTP {call.status}: {_text(payload.get('error')) or 'no message'}"
        return entry
    running, version = payload.get("running"), payload.get("version")
    if not isinstance(running, bool) or not (version is None or (
            isinstance(version, str) and VERSION_RE.fullmatch(version))):
        entry["error"] = "malformed answer: no 'running' true/false or no valid 'version'"
        return entry
    entry.update(running=running, version=version, active_state=_text(
        payload.get("active_state"), 64), since=_text(payload.get("since"), 40))
    update = payload.get("update")
    if isinstance(update, dict):
        entry["update"] = {key: _text(update.get(key)) for key in ("state", "version", "error")}
    entry["manager"] = manager_of(payload)
    return entry


def manager_of(status):
    """The manager version an agent's /status names (checked), or None."""
    manager = status.get("manager")
    version = manager.get("version") if isinstance(manager, dict) else None
    return version if isinstance(version, str) and VERSION_RE.fullmatch(version) else None


def agents_overview(settings, hub_version):
    """GET /agents: every agent's status, fetched at once within AGENT_STATUS_DEADLINE."""
    token = settings.agent_token()
    calls = [AgentCall(agent, "GET", "/status", token=token) for agent in settings.agent_list()]
    run_agent_calls(calls, AGENT_CONNECT_TIMEOUT, AGENT_STATUS_DEADLINE)
    agents = [agent_status(call) for call in calls]
    versions = dict(collections.Counter(e["version"] for e in agents if e["version"]))
    managers = dict(collections.Counter(e["manager"] for e in agents if e["manager"]))
    return {"agents": agents, "summary": {
        "total": len(agents), "reachable": sum(e["reachable"] for e in agents),
        "running": sum(e["running"] is True for e in agents), "versions": versions,
        "hub_version": hub_version,
        "skew": [e["agent"] for e in agents if e["version"] and e["version"] != hub_version],
        "manager_versions": managers, "hub_manager": __version__,
        "manager_skew": [e["agent"] for e in agents if e["manager"] and
                         e["manager"] != __version__]}}


# --- the rollout: a release, batch by batch, to the agents -------------------------------------
PENDING, ROLLING, INCOMPLETE, HALTED = "pending", "rolling", "incomplete", "halted"
ROLLOUT_WORKING = (PENDING, ROLLING)
# An agent in a rollout: WAITING for its turn, UPDATING (its POST /update is sent, or about to
# be), then one outcome: CURRENT, UNREACHABLE, SUCCEEDED, FAILED, ROLLED_BACK or LOST.
WAITING, UPDATING = "waiting", "updating"
CURRENT, UNREACHABLE, LOST = "current", "unreachable", "lost"
MANAGER_FAILED = "manager_failed"  # the service updated; the manager it carried did not take
AGENT_FAILURES = (FAILED, ROLLED_BACK, LOST, MANAGER_FAILED)  # against --rollout-max-failures


def agent_poll_interval(elapsed):
    """Seconds until the next GET /update of an agent whose update began `elapsed` seconds
    ago: a tenth of that, so that its end is seen at most about 10% late, between 50 ms (a
    small release updates in well under a second) and 1 s (a long update costs its agent one
    request a second)."""
    return min(1.0, max(0.05, elapsed / 10))


def plan_batches(agents, batches):
    """Split `agents` into batches: each spec a count or a percentage of all agents (at least
    one agent), the last spec repeating until every agent has a batch. The first is the
    canary."""
    planned, left, index = [], list(agents), 0
    while left:
        size, percent = batches[min(index, len(batches) - 1)]
        take = max(1, -(-size * len(agents) // 100)) if percent else size
        planned.append(left[:take])
        left = left[take:]
        index += 1
    return planned


def merge_spellings(agents, settings):
    """{agent: {"aliases": [...], "hub": True}} in the order given: agents whose host resolves
    to an address another listed agent has (at the same port) are one agent, listed once under
    its first spelling, its other spellings in `aliases`; `hub` marks an entry that is this
    hub's own manager. A name that does not resolve stays an agent of its own (unreachable
    when it is tried). Names are resolved by the system's resolver, without our deadline."""
    merged, seen, host_addresses = {}, [], []
    for agent in agents:
        host, _, port = agent.rpartition(":")
        try:
            addresses = {(info[4][0], int(port)) for info in socket.getaddrinfo(
                host.strip("[]"), int(port), type=socket.SOCK_STREAM)}
        except (OSError, UnicodeError, ValueError):  # unresolvable, or an invalid entry
            addresses = set()
        first = next((a for a, known in seen if known & addresses), None)
        if first:
            merged[first].setdefault("aliases", []).append(agent)
            continue
        seen.append((agent, addresses))
        own = any(_is_own(a, settings, host_addresses) for a in addresses)
        merged[agent] = {"hub": True} if own else {}
    return merged


def _is_own(address, settings, host_addresses):
    """Whether (ip, port) reaches this manager itself: its port, and its bind address (when
    bound to all addresses: any loopback address or one of the host name's, which are
    resolved once into the list `host_addresses` the caller keeps)."""
    ip, port = address
    if port != settings.port:
        return False
    if settings.bind not in ("0.0.0.0", "::"):
        return ip == settings.bind
    try:
        if ipaddress.ip_address(ip.partition("%")[0]).is_loopback:
            return True
    except ValueError:
        return False
    if not host_addresses:
        try:
            host_addresses.extend({i[4][0] for i in socket.getaddrinfo(socket.gethostname(),
                                                                        None)} or {""})
        except OSError:
            host_addresses.append("")  # resolved once, even when it fails
    return ip in host_addresses


def agent_record(call):
    """An agent's job record from its GET /update: the JSON object of a 200 answer; from an
    answer too big to take (an older agent's unbounded failure text), the top-level fields
    that can be read from its first part (action, state, version, rollout); else None."""
    if call.status == 200:
        return call.payload
    if not call.error or not call.error.startswith("answer over"):
        return None
    head, _, body = bytes(call.received[:16384]).partition(b"\r\n\r\n")
    if not STATUS_LINE.match(head.partition(b"\r\n")[0]) or not head.startswith(b"HTTP/1.1 200"):
        return None
    record = {}
    for key, value in re.findall(rb'"(action|state|version|rollout)": "([^"\\]{0,100})"', body):
        record.setdefault(key.decode(), value.decode("utf-8", "replace"))
    return record if "state" in record else None


def call_agent(agent, method, path, token, body=None):
    """One request to an agent's manager with the same deadlines as GET /agents; returns the
    finished AgentCall."""
    call = AgentCall(agent, method, path, body=body, token=token)
    run_agent_calls([call], AGENT_CONNECT_TIMEOUT, AGENT_STATUS_DEADLINE)
    return call


class Rollout:
    """Rolls one version out to the agents, batch by batch, canary first, at most
    --rollout-parallel at once inside a batch, until done, halted (POST /update/halt, or more
    failures than --rollout-max-failures) or the hub restarts, after which it goes on from its
    record (STATE/rollout.json). An agent is marked `updating` durably before its POST is sent,
    and an agent found `updating` after a restart is only polled: no agent gets two updates
    for one rollout."""

    def __init__(self, settings):
        self.settings = settings
        self.job = JobRecord(settings.state_dir, "rollout", ROLLOUT_WORKING)
        self.halt_requested = threading.Event()
        self.ended = lambda: None  # called once a rollout has ended

    def running(self):
        return self.job.working()

    def view(self, wait=True):
        return self.job.view(("state", "version", "error", "counts", "step", "started_at",
                              "finished_at", "agents"), wait)

    def begin(self, version, after_hub):
        """Record a new rollout of `version` (pending until the hub's own update succeeded,
        if after_hub); raises Busy if one is running, InvalidInput if there are no agents."""
        agents = self.settings.agent_list()
        if not agents:
            raise InvalidInput("no agents are configured (--agents)")
        merged = merge_spellings(agents, self.settings)
        batches = plan_batches(list(merged), self.settings.rollout_batches)
        entries = [{"agent": agent, "batch": number, "state": WAITING, "from_version": None,
                    "version": version, "step": None, "error": None, "started_at": None,
                    "finished_at": None, **merged[agent]}  # merged: aliases, hub
                   for number, batch in enumerate(batches, 1) for agent in batch]
        self.halt_requested.clear()
        self.job.begin({"action": "rollout", "state": PENDING, "version": version,
                        "id": os.urandom(8).hex(), "after_hub": after_hub, "halt": False,
                        "agents": entries, "counts": {}})

    def start(self):
        threading.Thread(target=self.run, name="rollout", daemon=True).start()

    def after_hub(self, state):
        """Called when the hub's own update ended: go on only if it succeeded."""
        if state == SUCCEEDED:
            self.run()
        else:
            self.job.set(HALTED, f"the hub's own update ended {state}; no agent was touched",
                         logging.ERROR, error=f"the hub's update ended {state}")

    def halt(self):
        with self.job.lock:
            if not self.running():
                raise Busy("no rollout is running")
            self.halt_requested.set()
        self.job.set(message="halt requested: agents mid-update finish, no new one starts",
                     halt=True, durable=True)

    def recover(self, hub_state, hub_version):
        """At start: go on with a rollout the manager was running when it stopped."""
        self.job.load()
        if not self.running():
            return
        if self.job.get("halt"):
            self.halt_requested.set()
        # Waiting for the hub's own update, which recovery has just ended: go on only if it
        # succeeded and the hub runs the version.
        if self.job.state == PENDING and self.job.get("after_hub") and (
                hub_state != SUCCEEDED or hub_version != self.job.get("version")):
            self.after_hub(hub_state if hub_state != SUCCEEDED else "on another version")
            return
        self.start()

    # --- the work
    def run(self):
        """The rollout from its record to an end state. Whatever goes wrong on the way (a
        record that cannot be saved, a bug), it ends halted with the error recorded: it never
        stays rolling with nothing running it."""
        try:
            self._run()
        except Exception as e:
            log.exception("the rollout failed unexpectedly")
            self.job.set(HALTED, f"rollout halted: internal error: {e}", logging.ERROR,
                         error=f"internal error: {e}")
        finally:
            self.ended()

    def _run(self):
        entries = self.job.get("agents")
        self.job.set(ROLLING, f"rolling version {self.job.get('version')} out to "
                     f"{len(entries)} agents", durable=True)
        for batch in sorted({e["batch"] for e in entries}):
            # Once stopping, no agent starts, but agents mid-update (after a restart, in any
            # batch) are still followed to their outcome.
            wanted = (UPDATING,) if self._stop_reason() else (WAITING, UPDATING)
            todo = [e for e in entries if e["batch"] == batch and e["state"] in wanted]
            if not todo:
                continue
            self.job.set(message=f"batch {batch}: {len(todo)} agents")
            work = queue.SimpleQueue()
            for entry in todo:
                work.put(entry)
            workers = [threading.Thread(target=self._worker, args=(work,), daemon=True)
                       for _ in range(min(self.settings.rollout_parallel, len(todo)))]
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join()
        self._finish()

    def _stop_reason(self):
        with self.job.lock:  # from the entries themselves: never a stale count
            failures = sum(e["state"] in AGENT_FAILURES for e in self.job.fields["agents"])
        if failures > self.settings.rollout_max_failures:
            return f"{failures} agents failed (--rollout-max-failures " \
                   f"{self.settings.rollout_max_failures})"
        if self.halt_requested.is_set():
            return "halted on request (POST /update/halt)"
        return None

    def _worker(self, work):
        while True:
            try:
                entry = work.get_nowait()
            except queue.Empty:
                return
            if entry["state"] == WAITING and self._stop_reason():
                continue  # no new agent starts; it stays waiting
            resumed = entry["state"] == UPDATING
            try:
                self._roll(entry)
            except Exception as e:  # one agent's surprise must not stop the bookkeeping
                log.exception("rollout to %s failed unexpectedly", entry["agent"])
                sent = resumed or entry.get("sent")  # else: unreachable, nothing was sent
                self._mark(entry, LOST if sent else UNREACHABLE,
                           f"internal error: {e}" + ("" if sent else "; nothing was sent"))

    def _mark(self, entry, state, error=None, durable=False, **fields):
        if state not in (WAITING, UPDATING):
            fields["finished_at"] = utc_now()
        self.job.update_entry(entry, state=state, error=error, **fields)
        self.job.set(message=f"{entry['agent']}: {state}" + (f" ({error})" if error else ""),
                     durable=durable, recount="agents")

    def _roll(self, entry):
        """One agent: current, unreachable, or its update sent once and followed to its end."""
        agent, version = entry["agent"], self.job.get("version")
        token = self.settings.agent_token()
        if entry["state"] == WAITING:
            if entry.get("hub"):  # listed among its own agents
                if installed_version_or_none(self.settings) == version:
                    return self._mark(entry, CURRENT, from_version=version)
                return self._mark(entry, UNREACHABLE, "this is the hub itself: update it with "
                                  "target 'hub' (nothing was sent)")
            status = call_agent(agent, "GET", "/status", token)
            info = agent_status(status)
            if info["error"] or not info["reachable"]:
                return self._mark(entry, UNREACHABLE, info["error"])
            if info["version"] == version:
                return self._mark(entry, CURRENT, from_version=info["version"])
            if self._stop_reason():  # a halt or a failure elsewhere meanwhile: not started
                return
            # Recorded durably before the POST: after a crash this agent is polled, not asked
            # again.
            self._mark(entry, UPDATING, started_at=utc_now(), step="sending the update",
                       from_version=info["version"], durable=True)
            self.job.update_entry(entry, sent=True)
            post = call_agent(agent, "POST", "/update", token,
                              body={"version": version, "rollout": self.job.get("id")})
            if not post.sent:
                return self._mark(entry, UNREACHABLE, f"sending the update: {post.error} "
                                  "(nothing was sent)")
            if post.status == 409 and self._adopt(entry, version, token):
                pass  # the agent was already updating to this version: followed
            elif post.status is None:
                pass  # sent, and the answer lost: the agent's own record tells
            elif post.status != 200 or not (post.payload or {}).get("success"):
                return self._mark(entry, FAILED, f"the agent refused the update: HTTP "
                                  f"{post.status}: {_text((post.payload or {}).get('error'))}")
        self._follow(entry, version, token)

    def _adopt(self, entry, version, token):
        """After a 409: True if the agent is already running an update to `version` (started
        by an operator or an earlier hub), which is then followed as this agent's outcome."""
        record = agent_record(call_agent(entry["agent"], "GET", "/update", token))
        if record and record.get("action") == "update" and record.get("version") == version \
                and record.get("state") in WORKING_STATES:
            self.job.update_entry(entry, adopted=True,
                                  step="already updating to this version: followed")
            return True
        return False

    def _follow(self, entry, version, token):
        """Poll the agent's GET /update until its job for `version` from this rollout (or the
        one adopted) ends, or the timeout. (A record without a `rollout` field, from an agent
        of an earlier version or too big to read whole, is matched by its version.)"""
        started = time.monotonic()
        last = "no answer yet"
        rollout_id = None if entry.get("adopted") else self.job.get("id")
        while time.monotonic() - started < self.settings.rollout_agent_timeout:
            call = call_agent(entry["agent"], "GET", "/update", token)
            record = agent_record(call)
            if record is None:
                last = call.error or f"HTTP {call.status}"
            elif record.get("version") != version or record.get("action") != "update" or (
                    rollout_id and record.get("rollout", rollout_id) != rollout_id):
                return self._mark(entry, LOST, "the agent's job is not this rollout's update "
                                  "(the hub restarted before it knew the update was sent; not "
                                  "sent again)")
            elif record.get("state") in FINAL_STATES:
                state = record["state"]
                manager = record.get("manager_update")
                if state == SUCCEEDED and isinstance(manager, str):
                    return self._follow_manager(entry, manager, token, started)
                return self._mark(entry, state, _text(record.get("error")),
                                  step=_text(record.get("step")))
            else:
                last = f"{_text(record.get('state'), 20)}: {_text(record.get('step'), 200)}"
                self.job.update_entry(entry, step=last)
            time.sleep(agent_poll_interval(time.monotonic() - started))
        self._mark(entry, LOST, f"no final state within {self.settings.rollout_agent_timeout:g} s"
                                f" (last: {last})")

    def _follow_manager(self, entry, version, token, started):
        """The agent's service is updated and its release carries manager `version`, which the
        agent takes between jobs: poll GET /status until that manager runs and passed its
        trial (succeeded), or the agent refused or reverted it (manager_failed)."""
        self.job.update_entry(entry, step=f"updated; waiting for its manager {version}")
        last = "no answer yet"
        while time.monotonic() - started < self.settings.rollout_agent_timeout:
            call = call_agent(entry["agent"], "GET", "/status", token)
            manager = call.payload.get("manager") if call.status == 200 else None
            if isinstance(manager, dict):
                failed = manager.get("failed")
                if isinstance(failed, dict) and version in failed:
                    return self._mark(entry, MANAGER_FAILED, f"its manager {version} did not "
                                      f"take: {_text(failed[version])}")
                if manager_of(call.payload) == version and manager.get("state") == GOOD:
                    return self._mark(entry, SUCCEEDED, None,
                                      step=f"version {self.job.get('version')} and manager "
                                      f"{version} are running")
                last = f"manager {_text(manager.get('version'), 64)} " \
                       f"({_text(manager.get('state'), 20)})"
            else:
                last = call.error or f"HTTP {call.status}"  # none while it hands over
            time.sleep(0.25)
        self._mark(entry, MANAGER_FAILED, f"its manager {version} did not report within "
                   f"{self.settings.rollout_agent_timeout:g} s (last: {last})")

    def _finish(self):
        entries = self.job.get("agents")
        reason = self._stop_reason()
        if all(e["state"] in (SUCCEEDED, CURRENT) for e in entries):
            state, error = SUCCEEDED, None  # also after a halt that stopped nothing
        elif reason:
            state, error = HALTED, reason
        else:
            state, error = INCOMPLETE, "some agents are not on the version: " + ", ".join(
                f"{e['agent']} {e['state']}" for e in entries
                if e["state"] not in (SUCCEEDED, CURRENT))
        level = logging.INFO if state == SUCCEEDED else logging.WARNING
        counts = ", ".join(f"{n} {s}" for s, n in sorted((self.job.get("counts") or {}).items()))
        self.job.set(state, f"rollout {state}: {counts or 'no agent'}", level, error=error,
                     durable=True)


# ============================================================================================
# Server: the endpoints (a routing table; every answer is JSON; every error has one shape), the
# checks every request passes (allow list, Host, cross-origin, token), and the server loop (one
# selector thread, a pool of workers, bounded connections) with its watchdog.
# ============================================================================================


def error_answer(error):
    """(status, payload, headers) of the one JSON error shape, for any exception."""
    status, headers = 500, {}
    if isinstance(error, HttpError):
        status, headers = error.status, error.headers
    elif isinstance(error, (InvalidInput, Busy)):
        status = 400 if isinstance(error, InvalidInput) else 409
    elif isinstance(error, SystemdError) and error.timed_out:
        status = 504
    message = error.message if isinstance(error, ManagerError) else f"internal error: {error}"
    return status, {"success": False, "error": message}, headers


def own_host_names(hosts_file="/etc/hosts"):
    """This machine's names: `localhost`, its host name, and every name on the lines of
    /etc/hosts that carry the host name (where Debian and Proxmox put the FQDN). Read from
    files only: no DNS query at start (socket.getfqdn() can hang where DNS is broken)."""
    hostname = socket.gethostname().lower().rstrip(".")
    names = {"localhost", hostname, hostname.split(".")[0]}
    with contextlib.suppress(OSError), open(hosts_file, encoding="utf-8", errors="replace") as f:
        for line in f:
            words = [w.lower().rstrip(".") for w in line.split("#", 1)[0].split()[1:]]
            if hostname in words or hostname.split(".")[0] in words:
                names.update(words)
    return frozenset(n for n in names if n)


def host_name_problem(host, own, allowed):
    """Why a request's `Host` header is refused (None if it is not). IP literals and an empty
    Host pass; a DNS name must be one of `own` or `allowed` ('.domain' covers the names under
    it; `allowed` None: no check). A page whose attacker-controlled name was re-pointed at
    this manager (DNS rebinding) sends its own name here, so it can read no answer."""
    if allowed is None or not host:
        return None
    name = host.lower()
    if name.startswith("["):  # [IPv6]:port
        name, _, port = name[1:].partition("]")
        if not re.fullmatch(r"(?::[0-9]*)?", port):
            name = host
    elif name.count(":") == 1:  # name:port, IPv4:port; more colons: a bare IPv6 literal
        name = name.partition(":")[0]
    with contextlib.suppress(ValueError):
        ipaddress.ip_address(name)
        return None
    name = name.rstrip(".")
    if name in own or name in allowed or any(
            a.startswith(".") and name.endswith(a) for a in allowed):
        return None
    return (f"host name {host[:100]!r} is not one of this manager's names: if the manager is "
            "reached by that name, add it to --allowed-hosts (BACKEND_AI_ALLOWED_HOSTS)")


def cross_origin_problem(request):
    """Why a request that can change something comes from another site's page (None if it
    does not). Browsers send "simple" requests (form posts, fetch no-cors, sendBeacon) to
    any site without asking it first; they say where such a request comes from in
    Sec-Fetch-Site, or, older ones, in Origin. A request with neither header does not come
    from a page (curl, scripts, a hub). The decision of Go's net/http CrossOriginProtection."""
    if request.method in ("GET", "HEAD"):
        return None
    site = request.header("sec-fetch-site")
    if site:
        if site in ("same-origin", "none"):
            return None
        return f"cross-origin request refused: Sec-Fetch-Site is {site[:40]!r}"
    origin = request.header("origin")
    if not origin:
        return None
    scheme, sep, netloc = origin.partition("://")
    if sep and netloc.lower() == request.header("host").lower():
        return None
    return (f"cross-origin request refused: Origin {origin[:100]!r} is not this manager "
            f"({request.header('host')[:100]!r})")


class Api:
    """The endpoints; each takes a Request and returns (status, dict)."""

    def __init__(self, settings, systemd, updater, rollout=None):
        self.settings = settings
        self.systemd = systemd
        self.updater = updater
        self.rollout = rollout  # a hub's
        # Checking that no job runs (nor the manager's own update) and starting one: one step.
        self.jobs_lock = updater.manager.lock
        self.own_names = own_host_names()
        self.hardening = running_hardening()
        self._host_checked = {}  # Host header -> its problem (None: fine), bounded
        self._token_problem = None  # what the journal was last told about the token file
        self._token_lock = threading.Lock()
        self._agents_flight = SingleFlight()
        self.routes = {
            ("GET", "/status"): self.status,
            **{("POST", f"/{action}"): lambda r, action=action: self.control(action)
               for action in ("start", "stop", "restart")},
            ("POST", "/update"): self.update,
            ("GET", "/update"): self.update_progress,
            ("POST", "/rollback"): self.rollback,
            ("GET", "/version"): self.version,
            ("GET", "/logs"): self.logs,
        }
        if rollout is not None:
            self.routes[("GET", "/agents")] = self.agents
            self.routes[("POST", "/update/halt")] = self.halt
        self.methods = {}  # path -> the methods it answers (HEAD wherever GET)
        for method, path in self.routes:
            self.methods.setdefault(path, set()).update(
                ("GET", "HEAD") if method == "GET" else (method,))
        self.methods = {path: sorted(m) for path, m in self.methods.items()}

    def instant(self, request):
        """True if `request` may be answered from memory, without a systemctl or journalctl
        call or a job to start: the server's connection thread then tries it itself (and hands
        it to a worker if it would have to wait after all: WouldWait)."""
        return request.method in ("GET", "HEAD") and request.path in ("/status", "/update",
                                                                       "/version")

    def respond(self, request, error=None):
        """The whole answer to a parsed request (or to the error its parsing raised); None if
        the request is `instant` and answering it would have to wait (WouldWait)."""
        headers = {}
        try:
            if error is not None:
                raise error
            self._access(request)
            methods = self.methods.get(request.path)
            if not methods:
                raise HttpError(404, f"no such endpoint: {request.path[:200]}")
            if request.method not in methods:
                raise HttpError(405, f"{request.method[:20]} is not allowed on "
                                f"{request.path}; use {', '.join(methods)}",
                                {"Allow": ", ".join(methods)})
            method = "GET" if request.method == "HEAD" else request.method
            status, payload = self.routes[(method, request.path)](request)
        except WouldWait:
            return None
        except Exception as e:
            if not isinstance(e, ManagerError):
                log.exception("%s %s failed", request.method, (request.target or "")[:200])
            status, payload, headers = error_answer(e)
        return render_answer(request, status, payload, headers)

    def _access(self, request):
        # The allow list was checked when the connection was accepted (Server._accept).
        host = request.header("host")
        problem = self._host_checked.get(host, False)
        if problem is False:
            problem = host_name_problem(host, self.own_names, self.settings.allowed_hosts)
            if len(self._host_checked) >= 64:
                self._host_checked.clear()
            self._host_checked[host] = problem
        problem = problem or cross_origin_problem(request)
        if problem:
            raise HttpError(403, problem)
        try:
            token = self.settings.token()
            self._token_is(None)
        except ConfigError as e:
            self._token_is(e.message)
            raise HttpError(401, f"{e.message}; every request is refused until it is fixed",
                            {"WWW-Authenticate": 'Bearer realm="backend-ai-manager"'}) from None
        if token:
            given = request.header("authorization")
            if not compare_digest(given.encode(), f"Bearer {token}".encode()):
                raise HttpError(401, "missing or wrong bearer token",
                                {"WWW-Authenticate": 'Bearer realm="backend-ai-manager"'})

    def _token_is(self, problem):
        """One journal line when the token file turns invalid (ERROR) or valid again."""
        if problem == self._token_problem:
            return
        with self._token_lock:
            if problem != self._token_problem:
                self._token_problem = problem
                if problem:
                    log.error("%s: every request is refused until it is fixed", problem)
                else:
                    log.info("the token file %s is valid again", self.settings.token_file)

    def status(self, request):
        wait = not request.instant
        result = self.systemd.status(max_age=self.systemd.STATUS_MAX_AGE, wait=wait)
        try:
            result["version"], result["name"] = installed_version(self.settings)
        except ManagerError as e:
            result["version"], result["name"], result["version_error"] = None, None, e.message
        result["update"] = self.updater.view(summary=True, wait=wait)
        result["manager"] = dict(self.updater.manager.view(), hardening=self.hardening)
        return 200, result

    def control(self, action):
        if self.updater.busy():
            raise Busy(f"cannot {action} {self.systemd.unit} while an update is running")
        before = self.systemd.show().get("ActiveState")
        self.systemd.control(action)
        after = self.systemd.show().get("ActiveState")
        changed = action == "restart" or before != after
        return 200, {"success": True, "action": action, "service": self.systemd.unit,
                     "changed": changed, "active_state": after}

    def update(self, request):
        body = request.json()
        version = parse_version(body.get("version"))
        target = body.get("target")
        rollout_id = body.get("rollout")
        if rollout_id is not None and not (isinstance(rollout_id, str) and re.fullmatch(
                r"[0-9a-f]{8,64}", rollout_id)):
            raise InvalidInput("invalid rollout: expected the hub's rollout id (hex)")
        if target not in (None, "hub", "agents"):
            raise InvalidInput(f"invalid target {target!r}: expected 'hub' or 'agents'")
        if target == "agents" and self.rollout is None:
            raise InvalidInput("target 'agents' is for a hub's manager")
        with self.jobs_lock:
            self.updater.manager.check_idle()
            if self.rollout is not None and self.rollout.running():
                raise Busy(f"a rollout of version {self.rollout.job.get('version')} to the "
                           "agents is running (POST /update/halt stops it)")
            if self.updater.busy():
                raise Busy(f"an {self.updater.job.get('action')} to version "
                           f"{self.updater.job.get('version')} is already running")
            if target == "agents":
                self.rollout.begin(version, after_hub=False)
                self.rollout.start()
                return 200, {"success": True, "message": f"Agents update to version {version} "
                             "started", "update": self.rollout.view()}
            then = None
            if target is None and self.rollout is not None and self.settings.agents:
                try:
                    listed = self.settings.agent_list()
                except ConfigError as e:  # nothing started: not the hub without its agents
                    raise ManagerError(f"{e.message}: fix the agent list, or update the hub "
                                       "alone with target 'hub'") from None
                if listed:  # an empty list: the hub alone
                    self.rollout.begin(version, after_hub=True)
                    then = self.rollout.after_hub
            try:
                record = self.updater.start_update(version, then=then, rollout=rollout_id)
            except ManagerError as e:
                if then:
                    then(f"not started ({e.message})")
                raise
        title = self.settings.title
        answer = {"success": True, "message": f"{title} update to version {version} started",
                  "update": record}
        if then:  # the rollout to the agents follows the hub's own update
            answer["agents"] = self.rollout.view()
        return 200, answer

    def update_progress(self, request):
        record = self.updater.view(wait=not request.instant)
        if self.rollout is not None and self.rollout.job.state != IDLE:
            record["agents"] = self.rollout.view(wait=not request.instant)
        return 200, record

    def halt(self, request):
        self.rollout.halt()
        return 200, {"success": True, "message": "halt requested: agents mid-update finish "
                     "their own update, no new agent starts", "update": self.rollout.view()}

    def rollback(self, request):
        with self.jobs_lock:
            self.updater.manager.check_idle()
            if self.rollout is not None and self.rollout.running():
                raise Busy("a rollout to the agents is running (POST /update/halt stops it)")
            record = self.updater.start_rollback()
        return 200, {"success": True, "message": f"{self.settings.title} rollback to version "
                     f"{record['version']} started", "update": record}

    def agents(self, request):
        """Every agent's status; one fan-out at a time, whose answer every request that came
        meanwhile shares (so this endpoint cannot multiply traffic to the agents)."""
        return 200, self._agents_flight.run(
            lambda: agents_overview(self.settings, installed_version_or_none(self.settings)))

    def version(self, request):
        version, name = installed_version(self.settings)
        return 200, {"version": version, "name": name}

    def logs(self, request):
        values = request.query_values("lines") or ["50"]
        if len(values) != 1 or not re.fullmatch(r"[0-9]{1,5}", values[0]) \
                or not 1 <= int(values[0]) <= 10000:
            raise InvalidInput(f"invalid lines {values!r}: expected one whole number from 1 to "
                               "10000")
        lines = int(values[0])
        return 200, {"service": self.systemd.unit, "lines": lines,
                     "logs": self.systemd.logs(lines)}


REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
           404: "Not Found", 405: "Method Not Allowed", 409: "Conflict",
           413: "Content Too Large", 414: "URI Too Long", 431: "Request Header Fields Too Large",
           500: "Internal Server Error", 503: "Service Unavailable", 504: "Gateway Timeout"}
requests_log = logging.getLogger("backend-ai-manager.requests")


SERVER_HEADER = f"Server: backend-ai-manager/{__version__}\r\n".encode()
JSON_HEADERS = b"Content-Type: application/json\r\nCache-Control: no-store\r\n"


@functools.lru_cache(maxsize=4)
def _date_header(second):
    return time.strftime("Date: %a, %d %b %Y %H:%M:%S GMT\r\n", time.gmtime(second)).encode()


def render_answer(request, status, payload, headers=None):
    """The whole answer to `request` as bytes; logs it (see log_answer). RFC 9112 9.3:
    HTTP/1.1 persists unless either side says close; HTTP/1.0 only if the client asked for
    keep-alive and the answer says keep-alive. An answer that ends the connection always says
    close, so no client waits for the idle timeout."""
    log_answer(request, status, payload.get("error") if status >= 400 else None)
    connection = "close" if request.close else (
        "keep-alive" if request.version == "HTTP/1.0" else None)
    return answer_bytes(status, payload, headers, connection, request.method != "HEAD")


def answer_bytes(status, payload, headers=None, connection=None, body=True):
    """An answer of the server: status line, headers, and `payload` as JSON."""
    data = (json.dumps(payload) + "\n").encode()
    parts = [f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\n".encode(), SERVER_HEADER,
             _date_header(int(time.time())), JSON_HEADERS,
             b"Content-Length: %d\r\n" % len(data)]
    for key, value in (headers or {}).items():
        parts.append(f"{key}: {value}\r\n".encode("latin-1", "replace"))
    if connection:
        parts.append(f"Connection: {connection}\r\n".encode())
    parts.append(b"\r\n")
    if body:
        parts.append(data)
    return b"".join(parts)


def log_answer(request, status, error=None):
    """One journal line per request that changed something (not GET or HEAD), failed or was
    refused: client, request, status, time taken, and an error's message; priority error for
    5xx. A successful GET or HEAD is a DEBUG line, shown with --log-requests: a hub polling
    /status must not fill the journal."""
    quiet = status < 400 and request.method in ("GET", "HEAD")
    if quiet and not requests_log.isEnabledFor(logging.DEBUG):
        return
    ms = (time.monotonic() - request.started) * 1000
    what = f"{request.method[:20]} {request.target[:200]}" if request.method else "-"
    what = what.encode("ascii", "backslashreplace").decode()
    level = logging.DEBUG if quiet else logging.ERROR if status >= 500 else logging.INFO
    requests_log.log(level, '%s "%s" %d %.0fms%s', request.client, what, status, ms,
                     f": {error}" if error else "")


class _Connection:
    def __init__(self, sock, address, deadline):
        self.sock, self.address, self.deadline = sock, address, deadline
        self.buf = bytearray()
        self.need = 0  # bytes the request in buf takes, once its head is whole
        self.linger = False  # answered a refused request: drain, then close
        self.idle = True  # no byte of the next request has arrived yet
        self.answered = False  # a request of it was answered (a hand-over may close it idle)


def client_allowed(address, networks):
    ip = ipaddress.ip_address(address.split("%")[0])
    if ip.version == 6 and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return any(ip in net for net in networks)


class Server:
    """HTTP/1.1 server hardened for a LAN without authentication:
    one selector thread reads requests from every connection, so idle or trickling clients hold
    no thread; complete requests go to a fixed pool of worker threads. At most
    --max-connections are open (past that: 503 and close); a request must arrive whole within
    --request-timeout of its first byte; an idle keep-alive connection is closed after 5 s."""

    WORKERS = 16
    ACCEPT_BATCH = 16
    KEEPALIVE = 5.0
    WRITE_TIMEOUT = 10.0

    def __init__(self, settings, api, max_connections=None):
        self.api = api
        self.settings = settings
        self.max_connections = max_connections or settings.max_connections
        self.listener = self._inherited(settings)
        if self.listener is None:
            family = socket.AF_INET6 if ":" in settings.bind else socket.AF_INET
            # No HTTPServer.server_bind(): it calls socket.getfqdn(), reverse DNS that hangs
            # where DNS is broken.
            self.listener = socket.socket(family, socket.SOCK_STREAM)
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                self.listener.bind((settings.bind, settings.port))
                self.listener.listen(128)
            except OSError:
                self.listener.close()
                raise
        self.listener.setblocking(False)
        self.server_address = self.listener.getsockname()
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.listener, selectors.EVENT_READ, None)
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.selector.register(self.wake_r, selectors.EVENT_READ, "wake")
        self.connections = set()
        self.lingering = {}  # refused sockets being drained before close: socket -> deadline
        self.returned = queue.Queue()  # connections handed back by workers (keep-alive)
        self.jobs = queue.Queue()  # (task_done counts what is in progress: see stuck())
        self.stopping = threading.Event()
        self.stopped = threading.Event()
        self.draining = None  # the hand-over's deadline (monotonic), once it drains
        self.heartbeat = self.last_done = time.monotonic()
        # A request may legitimately take a systemctl timeout plus writing its answer.
        self.progress_window = settings.command_timeout + self.WRITE_TIMEOUT + 30
        self.workers = [threading.Thread(target=self._work, name="worker", daemon=True)
                        for _ in range(self.WORKERS)]
        for worker in self.workers:
            worker.start()

    @staticmethod
    def _inherited(settings):
        """The listening socket a manager handing over passed on (LISTEN_FD_ENV), if it still
        listens where the settings say; connections waiting in its backlog are served here."""
        fd = os.environ.pop(LISTEN_FD_ENV, "")
        if not fd.isdigit():
            return None
        try:
            sock = socket.socket(fileno=int(fd))
        except OSError:
            return None
        sock.set_inheritable(False)
        host, port = sock.getsockname()[:2]
        try:
            if (ipaddress.ip_address(host), port) == (ipaddress.ip_address(settings.bind),
                                                      settings.port):
                return sock
        except ValueError:
            pass
        sock.close()  # the settings changed: listen anew
        return None

    # --- the selector thread
    def serve_forever(self, poll_interval=0.5):
        try:
            while not self.stopping.is_set():
                self.heartbeat = time.monotonic()
                for key, _ in self.selector.select(timeout=poll_interval):
                    if key.data is None:
                        self._accept()
                    elif key.data == "wake":
                        self._drain_wake()
                    elif key.data == "linger":
                        self._linger(key.fileobj)
                    else:
                        self._guarded(self._read, key.data)
                self._take_back()
                self._expire()
                if self.draining:
                    self._drain_turn()
        finally:
            registered = self._registered()  # connections a worker does not hold
            for conn in list(self.connections):
                if conn.idle or conn in registered:
                    self._close(conn)
            self.stopped.set()

    def drain(self, grace=5.0):
        """For a hand-over: accept no more (new connections wait in the listening socket's
        backlog for the next manager), finish the requests in progress, close each connection
        as it falls idle; returns once none is left (or after `grace` s) and the loop stopped."""
        self.draining = time.monotonic() + grace
        self._wake()
        self.stopped.wait(grace + 5)

    def _drain_turn(self):
        if self.listener in {k.fileobj for k in self.selector.get_map().values()}:
            self.selector.unregister(self.listener)
        for conn in self._registered():
            if conn.idle and conn.answered:  # a new one waits for its first request
                self._close(conn)
        if not self.connections or time.monotonic() > self.draining:
            self.stopping.set()

    def _registered(self):
        return {k.data for k in self.selector.get_map().values() if isinstance(k.data, _Connection)}

    def _accept(self):
        # A bounded batch, so that the loop turns and sees the other connections' events (the
        # clients that closed: a client reconnecting at once would otherwise keep it here).
        for _ in range(self.ACCEPT_BATCH):
            try:
                sock, address = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE and the like: keep serving the others, without spinning
                log.warning("accept failed: %s", e)
                time.sleep(0.05)
                return
            if len(self.connections) >= self.max_connections:
                self._reap()
            if len(self.connections) >= self.max_connections:
                self._refuse(sock, address, HttpError(503, f"too many connections (limit "
                                                      f"{self.max_connections}); try again "
                                                      "later"))
                continue
            if self.settings.allow and not client_allowed(address[0], self.settings.allow):
                self._refuse(sock, address, HttpError(403, f"client {address[0]} is not in the "
                                                      "allow list"))
                continue
            sock.setblocking(False)
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Connection(sock, address, time.monotonic() + self.settings.request_timeout)
            self.connections.add(conn)
            self.selector.register(sock, selectors.EVENT_READ, conn)
            self._guarded(self._read, conn)  # the request often came with the connection

    def _reap(self):
        """Close the idle connections whose clients have already closed theirs (their end of
        file not read yet), before refusing a new client for want of room."""
        for conn in self._registered():
            if conn.idle:
                try:
                    if conn.sock.recv(1, socket.MSG_PEEK) == b"":
                        self._close(conn)
                except (BlockingIOError, InterruptedError):
                    pass
                except OSError:
                    self._close(conn)

    def _refuse(self, sock, address, error):
        """Answer `error` without a worker, best effort, and close. (Not getpeername(): it
        raises on a client that already reset, which would end the selector thread.)"""
        status, payload, headers = error_answer(error)
        log.warning('%s "-" %d refused: %s', address[0], status, error.message)
        try:
            sock.setblocking(False)
            sock.send(answer_bytes(status, payload, headers, "close"))
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            sock.close()
            return
        self._drain_then_close(sock)

    def _drain_then_close(self, sock):
        """Lingering close of a socket shut for writing: closing with the client's request still
        unread would send a reset that can destroy the answer in flight; read and drop what
        comes for up to 2 s (at most 256 sockets at once), then close."""
        if len(self.lingering) >= 256:
            sock.close()
            return
        sock.setblocking(False)
        self.lingering[sock] = time.monotonic() + 2
        self.selector.register(sock, selectors.EVENT_READ, "linger")

    def _linger(self, sock, force=False):
        try:
            data = b"" if force else sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.selector.unregister(sock)
            self.lingering.pop(sock, None)
            sock.close()

    def _read(self, conn):
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close(conn)
            return
        if conn.idle:
            conn.idle = False
            conn.deadline = time.monotonic() + self.settings.request_timeout
        conn.buf += data
        self._hand_over(conn)

    def _hand_over(self, conn):
        """Read the next request of `conn` (read_request); answer it here if that needs no waiting
        (Api.instant: one thread, no hand-over), else hand it to a worker."""
        while True:
            if len(conn.buf) < conn.need:
                return
            framed = read_request(conn.buf, conn.address[0])
            if framed is None:
                return
            length, request, error = framed
            if request is None:  # the head is whole, the body not yet
                conn.need = length
                return
            conn.need = 0
            del conn.buf[:length]
            request.close = request.close or bool(self.draining)  # the last on this connection
            request.instant = error is None and not self.stopping.is_set() and \
                self.api.instant(request)
            data = self.api.respond(request) if request.instant else None
            if data is None:  # a worker's: it may wait (systemctl, a lock, a job to start)
                request.instant = False
                self.selector.unregister(conn.sock)
                self.jobs.put((conn, request, error))
                return
            try:
                sent = conn.sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self._close(conn)
                return
            if sent < len(data):  # a client not reading: the rest is a worker's, with its timeout
                self.selector.unregister(conn.sock)
                self.jobs.put((conn, request, data[sent:]))
                return
            if request.close:
                self._close(conn)
                return
            self._rearm(conn)

    def _rearm(self, conn):
        """After an answer: an idle connection may wait KEEPALIVE for its next request."""
        conn.answered = True
        conn.idle = not conn.buf
        conn.deadline = time.monotonic() + (self.KEEPALIVE if conn.idle
                                            else self.settings.request_timeout)

    def _guarded(self, step, conn):
        try:
            step(conn)
        except Exception:  # one connection's trouble must not end the loop
            log.exception("request from %s failed", conn.address[0])
            self._close(conn)

    def _take_back(self):
        while True:
            try:
                conn = self.returned.get_nowait()
            except queue.Empty:
                return
            if self.stopping.is_set():
                self._close(conn)
                continue
            if conn.linger:  # answered and shut for writing: drain, then close
                self.connections.discard(conn)
                self._drain_then_close(conn.sock)
                continue
            conn.sock.setblocking(False)
            self._rearm(conn)
            self.selector.register(conn.sock, selectors.EVENT_READ, conn)
            if conn.buf:
                self._guarded(self._hand_over, conn)  # a pipelined request already arrived

    def _expire(self):
        now = time.monotonic()
        for sock, deadline in list(self.lingering.items()):
            if now > deadline:
                self._linger(sock, force=True)
        for conn in self._registered():
            if now > conn.deadline:
                if not conn.idle:
                    log.warning("%s did not send a whole request within %g s; closed",
                                conn.address[0], self.settings.request_timeout)
                self._close(conn)

    def _close(self, conn):
        try:
            self.selector.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()
        self.connections.discard(conn)

    def _drain_wake(self):
        try:
            while self.wake_r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def _wake(self):
        try:
            self.wake_w.send(b"x")
        except OSError:
            pass

    # --- the workers
    def _work(self):
        while True:
            job = self.jobs.get()
            if job is None:
                self.jobs.task_done()
                return
            conn, request, extra = job  # extra: the parse error, or the rest of an answer
            keep = linger = False
            try:
                conn.sock.settimeout(self.WRITE_TIMEOUT)
                if isinstance(extra, bytes):
                    data = extra
                else:
                    if extra is not None:
                        request.close = True  # nothing after a bad request is read
                    if self.stopping.is_set() or self.draining:
                        request.close = True
                    data = self.api.respond(request, extra)
                conn.sock.sendall(data)
                keep = not request.close
                # A refused request may have more of itself unread: closing now would reset
                # the connection, which can destroy the answer on its way to the client.
                linger = not keep and extra is not None and not isinstance(extra, bytes)
                if linger:
                    conn.sock.shutdown(socket.SHUT_WR)
            except OSError:
                linger = False  # the client went away
            except Exception:
                log.exception("request from %s failed", conn.address[0])
            if (keep or linger) and not self.stopping.is_set():
                conn.linger = linger
                self.returned.put(conn)
                self._wake()
            else:
                conn.sock.close()
                self.connections.discard(conn)
            self.last_done = time.monotonic()
            self.jobs.task_done()

    def stuck(self):
        """Why the server is not serving (for the watchdog), or None."""
        now = time.monotonic()
        if now - self.heartbeat > 5:
            return f"the connection loop has not turned for {now - self.heartbeat:.0f} s"
        if self.jobs.unfinished_tasks >= self.WORKERS and \
                now - self.last_done > self.progress_window:
            return f"all {self.WORKERS} workers busy and none finished for " \
                   f"{now - self.last_done:.0f} s"
        return None

    # --- stopping
    def shutdown(self, grace=30.0):
        """Stop reading new requests, let the requests already read finish (up to `grace`
        seconds), then stop the workers."""
        self.stopping.set()
        self._wake()
        self.stopped.wait(5)
        deadline = time.monotonic() + grace
        while self.jobs.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.05)
        for _ in self.workers:
            self.jobs.put(None)

    def server_close(self):
        self.selector.close()
        self.listener.close()
        self.wake_r.close()
        self.wake_w.close()


class Watchdog(threading.Thread):
    """Pings systemd's watchdog (WatchdogSec=, sd_watchdog_enabled(3)) only while the server
    is alive: its selector loop has turned within the last few seconds, and a worker is free or
    one finished a request recently. A frozen manager, a stuck loop or deadlocked workers stop
    the pings and systemd restarts the manager. (Not a request to itself: slow legitimate
    requests occupying every worker would starve such a probe and get a healthy manager killed
    mid-update.)"""

    def __init__(self, server, stop):
        super().__init__(name="watchdog", daemon=True)
        usec = os.environ.get("WATCHDOG_USEC", "")
        pid = os.environ.get("WATCHDOG_PID", "")
        enabled = usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid()))
        self.interval = int(usec) / 2e6 if enabled else None
        self.server = server
        self.stop = stop

    def start(self):
        if self.interval:
            super().start()

    def run(self):
        while not self.stop.wait(self.interval):
            problem = self.server.stuck()
            if problem:
                log.warning("watchdog: %s; not pinging systemd", problem)
            else:
                sd_notify("WATCHDOG=1")


# ============================================================================================
# Command line: the operator's client (status, update, agents, pack, ...: exit status 0 done,
# 1 the operation failed, 2 usage, 3 the service is not running, 4 the manager could not be
# reached), install/uninstall of the manager's unit, check, and serve.
# ============================================================================================


CLIENT_DEADLINES = {"GET": 30.0, "POST": 300.0}  # a POST /restart waits for systemctl
ROLLOUT_FINAL = (SUCCEEDED, INCOMPLETE, HALTED)
AGENT_OUTCOMES = (CURRENT, UNREACHABLE, SUCCEEDED, FAILED, ROLLED_BACK, LOST, MANAGER_FAILED)


class Client:
    """Talks to one manager and prints for a person, or JSON for a script (--json)."""

    def __init__(self, host, token_file, as_json, out=None, err=None):
        try:
            self.host = parse_agents(host)[0] if host.strip() else ""
        except ValueError as e:
            raise ClientError(f"invalid --host {host!r}: {e}", EXIT_USAGE) from None
        if not self.host:
            raise ClientError("--host is empty", EXIT_USAGE)
        self.token = None
        if token_file:
            self.token, problem = read_token_file(token_file)
            if problem:
                raise ClientError(f"--token-file {token_file} is not valid: {problem}",
                                  EXIT_USAGE)
            exposed = token_file_exposed(token_file)
            if exposed:
                print(f"warning: {exposed}", file=err or sys.stderr)
        self.as_json = as_json
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.tty = self.out.isatty() and not as_json
        self.bar_shown = False
        self.started = time.monotonic()

    # --- talking to the manager
    def call(self, method, path, body=None):
        """The manager's JSON answer to one request; raises ClientError (exit 4 when there is
        no answer, 1 for an error answer, with the manager's own message)."""
        call = AgentCall(self.host, method, path, body=body, token=self.token)
        call.limit = 64 << 20
        run_agent_calls([call], AGENT_CONNECT_TIMEOUT, CLIENT_DEADLINES[method])
        if call.status is None:
            if method != "GET" and call.sent and not call.answered:
                raise ClientError(f"{method} {path} was sent to {self.host} but no answer came "
                                  f"({call.error}): it may have started; see `status`",
                                  EXIT_UNREACHABLE)
            raise ClientError(f"cannot reach the manager at {self.host}: {call.error}",
                              EXIT_UNREACHABLE if not call.answered else EXIT_FAILED)
        if call.status >= 400:
            raise ClientError(f"{method} {path}: HTTP {call.status}: "
                              f"{call.payload.get('error') or 'no message'}")
        return call.payload

    # --- printing
    def say(self, line):
        self._clear_bar()
        print(line, file=self.out, flush=True)

    def stamp(self, line):
        self.say(f"[{time.monotonic() - self.started:6.1f}s] {line}")

    def dump(self, document):
        print(json.dumps(document, indent=2), file=self.out, flush=True)

    def _clear_bar(self):
        if self.bar_shown:
            self.out.write("\r\x1b[K")
            self.bar_shown = False

    def bar(self, record):
        """The download's progress on one terminal line, redrawn in place."""
        if not self.tty:
            return
        done, total = record.get("bytes") or 0, record.get("total")
        width = 30
        if total:
            filled = min(width, int(width * done / total))
            text = f"[{'#' * filled}{'.' * (width - filled)}] {100 * done // total:3d}%  " \
                   f"{done / 1e6:.1f} of {total / 1e6:.1f} MB"
        else:
            text = f"{done / 1e6:.1f} MB"
        self.out.write(f"\r\x1b[K  downloading {text}, {record.get('files') or 0} files")
        self.out.flush()
        self.bar_shown = True

    # --- the commands
    def status(self, args):
        answer = self.call("GET", "/status")
        self.dump(answer) if self.as_json else self.say("\n".join(describe_status(answer)))
        return EXIT_OK if answer.get("running") is True else EXIT_NOT_RUNNING

    def version(self, args):
        answer = self.call("GET", "/version")
        self.dump(answer) if self.as_json else self.say(
            f"{answer.get('version')} {answer.get('name') or ''}".rstrip())
        return EXIT_OK

    def logs(self, args):
        answer = self.call("GET", f"/logs?lines={args.lines}")
        if self.as_json:
            self.dump(answer)
        else:
            self.out.write(answer.get("logs") or "")
            if answer.get("logs") and not answer["logs"].endswith("\n"):
                self.out.write("\n")
            self.out.flush()
        return EXIT_OK

    def control(self, args):
        answer = self.call("POST", f"/{args.command}")
        if self.as_json:
            self.dump(answer)
            return EXIT_OK
        done = "done" if answer.get("changed", True) else "nothing to do"
        self.say(f"{answer.get('service')}: {args.command} {done}")
        self.say("\n".join(describe_status(self.call("GET", "/status"))))
        return EXIT_OK

    def agents(self, args):
        answer = self.call("GET", "/agents")
        if self.as_json:
            self.dump(answer)
            return EXIT_OK
        rows = [("AGENT", "REACHABLE", "STATE", "VERSION", "SINCE", "UPDATE", "RTT", "MANAGER")]
        for entry in answer.get("agents") or []:
            update = entry.get("update") or {}
            rows.append((
                entry.get("agent") or "?", "yes" if entry.get("reachable") else "no",
                entry.get("active_state") or ("-" if not entry.get("error") else "error"),
                entry.get("version") or "-", entry.get("since") or "-",
                " ".join(str(update.get(k)) for k in ("state", "version") if update.get(k))
                or "-", f"{entry['rtt_ms']:.0f} ms" if entry.get("rtt_ms") is not None else "-",
                entry.get("manager") or "-"))
        widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
        for row in rows:
            self.say("  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip())
        for entry in answer.get("agents") or []:
            if entry.get("error"):
                self.say(f"{entry.get('agent')}: {entry['error']}")
        summary = answer.get("summary") or {}
        versions = ", ".join(f"{v}: {n}" for v, n in sorted((summary.get("versions") or
                                                              {}).items())) or "none"
        skew = ", ".join(summary.get("skew") or []) or "none"
        self.say(f"{summary.get('total', 0)} agents, {summary.get('reachable', 0)} reachable, "
                 f"{summary.get('running', 0)} running; versions {versions}; hub "
                 f"{summary.get('hub_version') or '-'}; not on the hub's version: {skew}")
        managers = ", ".join(f"{v}: {n}" for v, n in sorted((summary.get("manager_versions")
                                                              or {}).items())) or "none"
        self.say(f"managers {managers}; hub's {summary.get('hub_manager') or '-'}; not on the "
                 f"hub's manager: {', '.join(summary.get('manager_skew') or []) or 'none'}")
        return EXIT_OK

    def update(self, args):
        body = {"version": args.version, **({"target": args.target} if args.target else {})}
        return self._job("/update", body, args.no_wait, rollout_only=args.target == "agents")

    def rollback(self, args):
        return self._job("/rollback", None, args.no_wait)

    def _job(self, path, body, no_wait, rollout_only=False):
        answer = self.call("POST", path, body)
        if no_wait:
            self.dump(answer) if self.as_json else self.say(answer.get("message", "started"))
            return EXIT_OK
        if not self.as_json:
            self.say(answer.get("message", "started"))
        follow_rollout = rollout_only or bool(answer.get("agents"))
        record = None if rollout_only else self._follow_job(answer.get("update") or {})
        code = EXIT_OK
        if record is not None and record.get("state") != SUCCEEDED:
            code, follow_rollout = EXIT_FAILED, False  # the hub's rollout halts untouched
            if not self.as_json:
                self.say(f"{record.get('action')} {record.get('state')}: "
                         f"{record.get('error') or 'no reason given'}")
                if answer.get("agents"):
                    self.say("no agent was touched")
        elif record is not None and not self.as_json:
            self.say(f"{record.get('action')} succeeded: version {record.get('version')} is "
                     "running")
        final = record
        if follow_rollout:
            rollout = self._follow_rollout()
            final = dict(record, agents=rollout) if record else rollout
            if rollout.get("state") != SUCCEEDED:
                code = EXIT_FAILED
        if self.as_json:
            self.dump(final)
        return code

    CONTACT_GRACE = 60  # seconds a job is followed through a manager that does not answer

    def _poll(self):
        """GET /update while following a job: a manager that stops answering (a network blip,
        its restart) is asked again every second for CONTACT_GRACE seconds before giving up;
        the job goes on there either way."""
        lost = None
        while True:
            try:
                record = self.call("GET", "/update")
                if lost is not None:
                    print("in contact again", file=self.err, flush=True)
                return record
            except ClientError as e:
                if e.code != EXIT_UNREACHABLE:
                    raise
                if lost is None:
                    lost = time.monotonic()
                    self._clear_bar()
                    print(f"no answer ({e.message}); asking again for {self.CONTACT_GRACE} s",
                          file=self.err, flush=True)
                elif time.monotonic() - lost > self.CONTACT_GRACE:
                    raise ClientError(f"lost contact with the manager at {self.host} for "
                                      f"{self.CONTACT_GRACE} s; the job goes on there: see "
                                      "`status`", EXIT_UNREACHABLE) from None
                time.sleep(1)

    def _follow_job(self, first):
        """Poll GET /update until the job this manager started has ended, printing each step
        as it happens; returns the final record."""
        started_at = first.get("started_at")
        printed = set()
        while True:
            record = self._poll()
            if started_at and record.get("started_at") != started_at:
                raise ClientError("another job replaced this one on the manager (its record "
                                  f"now shows {record.get('action')} {record.get('version')})")
            for entry in record.get("log") or []:
                key = (entry.get("elapsed"), entry.get("message"))
                if key not in printed:
                    printed.add(key)
                    if not self.as_json:
                        self.stamp(f"{entry.get('state')}: {entry.get('message')}")
            state = record.get("state")
            if state not in WORKING_STATES:
                return record
            if state == DOWNLOADING:
                self.bar(record)
            time.sleep(0.2)

    def _follow_rollout(self):
        """Poll GET /update's `agents` (the rollout) until it has ended, printing each agent's
        outcome as it comes and the rollout's steps; returns the final rollout record."""
        outcomes, step = {}, None
        while True:
            rollout = self._poll().get("agents") or {}
            if not self.as_json:
                for entry in rollout.get("agents") or []:
                    agent, state = entry.get("agent"), entry.get("state")
                    if state == UPDATING and agent not in outcomes or \
                            state in AGENT_OUTCOMES and outcomes.get(agent) != state:
                        outcomes[agent] = state
                        change = "" if state == UPDATING else (
                            f", {entry.get('from_version') or '?'} -> {entry.get('version')}"
                            + (f": {entry['error']}" if entry.get("error") else ""))
                        self.stamp(f"agent {agent} (batch {entry.get('batch')}): {state}{change}")
                new_step = rollout.get("step")
                if new_step and new_step != step and rollout.get("state") not in ROLLOUT_FINAL:
                    step = new_step
                    if not any(step.startswith(f"{e.get('agent')}:")
                               for e in rollout.get("agents") or []):
                        self.stamp(f"rollout: {step}")
            if rollout.get("state") in ROLLOUT_FINAL:
                if not self.as_json:
                    counts = ", ".join(f"{n} {s}" for s, n in sorted(
                        (rollout.get("counts") or {}).items()))
                    self.say(f"rollout {rollout.get('state')}: {len(rollout.get('agents') or [])}"
                             f" agents: {counts or 'none'}" + (f"; {rollout['error']}"
                                                               if rollout.get("error") else ""))
                return rollout
            time.sleep(0.25)


def describe_status(answer):
    """/status for a person: the service line, the version, the update."""
    since = f" since {answer['since']}" if answer.get("since") else ""
    pid = f", pid {answer['main_pid']}" if answer.get("main_pid") else ""
    restarts = f", {answer['restarts']} restarts" if answer.get("restarts") is not None else ""
    lines = [f"{answer.get('service')}: {answer.get('active_state')} ({answer.get('sub_state')})"
             f"{since}{pid}{restarts}"]
    if answer.get("version"):
        lines.append(f"version: {answer['version']} {answer.get('name') or ''}".rstrip())
    else:
        lines.append(f"version: unknown ({answer.get('version_error')})")
    update = answer.get("update") or {}
    if update.get("state") and update.get("state") != IDLE:
        text = f"last {update.get('action') or 'update'}: {update['state']} " \
               f"{update.get('version') or ''}".rstrip()
        lines.append(text + (f": {update['error']}" if update.get("error") else ""))
    manager = answer.get("manager") or {}
    if "release_signers" in manager:
        signers = manager["release_signers"]
        lines.append(f"releases: signed, checked against {signers}" if signers else
                     "releases: not signed (no --release-signers)")
    if manager:
        hardening = f", hardening: {manager['hardening']}" if manager.get("hardening") else ""
        lines.append(f"manager: {manager.get('version')} ({manager.get('role')}, "
                     f"{manager.get('state') or 'good'}){hardening}")
        last = manager.get("self_update") or {}
        if last.get("version"):
            error = f": {last['error']}" if last.get("error") else ""
            previous = f" (previous {manager['previous']})" if manager.get("previous") else ""
            lines.append(f"manager update: {last['version']} {last.get('state')}{error}{previous}")
    return lines


def run_client(args):
    """One client command; returns its exit status."""
    if args.command == "pack":
        try:
            path, digest = pack_release(
                args.build_dir, args.kind, args.out,
                say=lambda line: print(line, file=sys.stderr if args.json else sys.stdout),
                manager=os.path.abspath(__file__) if args.manager else None, sign=args.sign)
        except ClientError as e:
            print(f"backend_ai_manager.py pack: error: {e.message}", file=sys.stderr)
            return e.code
        except OSError as e:
            print(f"backend_ai_manager.py pack: error: {e.filename or ''}: {e.strerror}",
                  file=sys.stderr)
            return EXIT_FAILED
        print(json.dumps({"tarball": path, "sha256": digest}) if args.json
              else f"{path}\n{path}.sha256: {digest}")
        return EXIT_OK
    try:
        client = Client(args.host, args.token_file, args.json)
        handler = {"status": client.status, "version": client.version, "logs": client.logs,
                   "start": client.control, "stop": client.control, "restart": client.control,
                   "update": client.update, "rollback": client.rollback,
                   "agents": client.agents}[args.command]
        return handler(args)
    except ClientError as e:
        if "client" in locals():
            client._clear_bar()
        print(f"backend_ai_manager.py {args.command}: error: {e.message}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print(f"backend_ai_manager.py {args.command}: interrupted (the manager's job, if any, "
              "goes on)", file=sys.stderr)
        return 130


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # one clear line and a non-zero exit, before the port is bound
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser():
    parser = _Parser(prog="backend_ai_manager.py",
                     description="Control one systemd service over HTTP (backend-ai-manager): "
                     "`serve` runs the daemon; the other commands talk to one.")
    parser.add_argument("--version", action="version", version=__version__)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    daemon = commands.add_parser("serve", help="run the daemon")
    checker = commands.add_parser("check", help="resolve and validate serve's settings as "
                                  "serve would, print them, change nothing (exit 2 if invalid)")
    installer = commands.add_parser(
        "install", help="as root: install this file as the role's systemd service with serve's "
        "options (in /etc/default), probing the hardening; enable, start, show /status")
    installer.add_argument("--dry-run", action="store_true",
                           help="print what would be written, write nothing")
    tester = commands.add_parser("self-test", help="what a manager checks of a new one before "
                                 "handing over to it: run here with serve's settings, read the "
                                 "state dir, change nothing, print the version as JSON")
    remover = commands.add_parser("uninstall", help="as root: stop the role's service and "
                                  "remove what install wrote (the state dir stays)")
    remover.add_argument("--role", choices=list(ROLES), required=True)
    for option in OPTIONS:
        text = ("hub only: " if option.hub_only else "") + f"{option.help} (${option.env})"
        kind = {"action": "store_const", "const": True} if option.parse is _bool else {
            "choices": list(ROLES) if option.name == "role" else None}
        for command in (daemon, checker, installer, tester):
            command.add_argument(option.flag, dest=option.name, default=None, help=text, **kind)
    common = _Parser(add_help=False)
    common.add_argument("--host", default=os.environ.get("BACKEND_AI_HOST", "127.0.0.1:3081"),
                        help="the manager, HOST[:PORT] ($BACKEND_AI_HOST; default "
                        "127.0.0.1:3081)")
    common.add_argument("--token-file", default=os.environ.get("BACKEND_AI_TOKEN_FILE", ""),
                        help="file holding the bearer token ($BACKEND_AI_TOKEN_FILE)")
    common.add_argument("--json", action="store_true",
                        help="print the manager's JSON document, nothing else")
    for name, text in (("status", "the service's state (exit 3 if it is not running)"),
                       ("version", "the installed version"), ("start", "start the service"),
                       ("stop", "stop the service"), ("restart", "restart the service"),
                       ("agents", "a hub's agents as a table")):
        commands.add_parser(name, parents=[common], help=text)
    logs = commands.add_parser("logs", parents=[common], help="the service's journal")
    lines = _int_in(1, 10000)
    lines.__name__ = "line count (1 to 10000)"  # argparse: "invalid line count ... value"
    logs.add_argument("-n", "--lines", type=lines, default=50,
                      help="lines, 1 to 10000 (default 50)")
    update = commands.add_parser("update", parents=[common],
                                 help="update to VERSION and follow it to its end")
    update.add_argument("version", metavar="VERSION")
    update.add_argument("--target", choices=("hub", "agents"),
                        help="on a hub: only the hub, or only the agents (default: the hub, "
                        "then its agents)")
    update.add_argument("--no-wait", action="store_true", help="return once it has started")
    rollback = commands.add_parser("rollback", parents=[common],
                                   help="go back to the previous release, following it")
    rollback.add_argument("--no-wait", action="store_true", help="return once it has started")
    pack = commands.add_parser("pack", help="write a release tarball and its .sha256 from a "
                               "build: NAS_ROOT/V/KIND-V.tar.gz")
    pack.add_argument("build_dir", metavar="BUILD_DIR")
    pack.add_argument("--kind", choices=("hub", "agent"), required=True)
    pack.add_argument("--out", required=True, metavar="NAS_ROOT")
    pack.add_argument("--json", action="store_true", help="print the result as JSON")
    pack.add_argument("--sign", metavar="KEY", help="also write .sha256.sig, signed with this "
                      "OpenSSH key (ssh-keygen -Y sign)")
    pack.add_argument("--no-manager", dest="manager", action="store_false",
                      help=f"leave this manager out (by default it rides along as "
                      f"{MANAGER_IN_RELEASE})")
    return parser


# --- install: the manager as a systemd service of this host -----------------------------------
INSTALL_LIB = "/usr/local/lib/backend-ai-manager"
UNIT_DIR = "/etc/systemd/system"
DEFAULTS_DIR = "/etc/default"


# The unit's own mount directives, given to the probe with the drop-in's.
MOUNT_HARDENING = ("ProtectSystem=full", "ProtectHome=read-only", "PrivateTmp=yes",
                   "PrivateDevices=yes", "ProtectKernelModules=yes", "ProtectKernelLogs=yes")
PROBE_EXTRA = "BACKEND_AI_INSTALL_PROBE_EXTRA"  # for tests: more -p properties for the probe
UNIT_TEMPLATE = """\
# backend-ai-manager for the {kind} host{s}: the lifecycle API for ai-{kind}.service on {bind}:3081{lan}.
# Installed by `python3 backend_ai_manager.py install --role {kind} [options]` (or `make install`),
# which also writes the options to /etc/default/ai-{kind}-manager (they win over the Environment=
# lines below) and, where systemd can set up a fresh /proc for it, the drop-in
# ai-{kind}-manager.service.d/hardening.conf.
[Unit]
Description=Backend AI {title} Manager (lifecycle API for ai-{kind}.service)
After=network-online.target
Wants=network-online.target
# Never give up restarting the manager (RestartSec= below paces it): it is how the fleet reaches
# this host, and a restarted manager finishes or undoes an interrupted update.
StartLimitIntervalSec=0

[Service]
# READY=1 is sent once the socket listens; WATCHDOG=1 every 10 s while the server is alive:
# a stuck or frozen manager is killed and restarted.
Type=notify
WatchdogSec=20s
TimeoutStopSec=45s
# SIGTERM to the manager alone: a systemctl it is running for a request in flight must finish
# (the default would kill it too and that request would fail); leftovers get SIGKILL at the end.
KillMode=mixed
User=root
Environment=BACKEND_AI_ROLE={kind}
Environment=BACKEND_AI_BIND={bind}
EnvironmentFile=-/etc/default/ai-{kind}-manager
ExecStart=/usr/bin/python3 /usr/local/lib/backend-ai-manager/backend_ai_manager.py serve
Restart=always
RestartSec=2

# Hardening, as far as the job allows. Left out, and why (see README "Security model"):
# ProtectSystem=strict (the install and state dirs are settings, so ReadWritePaths= cannot be
# fixed here; =full keeps /usr, /boot and /etc read-only), User=/DynamicUser= (starting and
# stopping another unit and writing its install dir need root), PrivateNetwork=/IPAddressDeny=
# (it serves the LAN and downloads from the NAS), MemoryDenyWriteExecute= (ctypes/libffi may
# need writable+executable memory), ProtectProc= (systemd 247+; the manager only reads its own).
# ProtectKernelTunables= and ProtectControlGroups= are in the drop-in hardening.conf.
NoNewPrivileges=yes
{mount}
ProtectClock=yes
ProtectHostname=yes
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallErrorNumber=EPERM
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
CapabilityBoundingSet=CAP_DAC_OVERRIDE CAP_DAC_READ_SEARCH CAP_FOWNER CAP_KILL
UMask=0022
# One malloc arena: the update's threads (download, writers, flusher) each freeing MB-sized
# buffers into an arena of their own kept 4-5 MB more resident after an update; with one arena
# the growth over idle is about 1 MB, at the same speed (the threads mostly hold Python's lock
# anyway). glibc reads this only at start.
Environment=MALLOC_ARENA_MAX=1

[Install]
WantedBy=multi-user.target
"""
DROPIN_TEMPLATE = """\
# The hardening that needs a fresh /proc in the unit's mount namespace. `install` writes this file
# only where a probe (systemd-run with the same properties) passes: inside a Proxmox container
# without nesting, systemd cannot mount it and the unit would fail with 226/NAMESPACE.
[Service]
{lines}
"""


def unit_files(role):
    """{path: text} of the unit and its hardening drop-in for `role`, as systemd/ ships them."""
    hub = role == "hub"
    unit = UNIT_TEMPLATE.format(
        kind=role, s="" if hub else "s", title="Hub" if hub else "Agent",
        bind=next(o for o in OPTIONS if o.name == "bind").default[role],
        lan="" if hub else " (the LAN)", mount="\n".join(MOUNT_HARDENING))
    name = f"ai-{role}-manager.service"
    return {os.path.join(UNIT_DIR, name): unit,
            os.path.join(UNIT_DIR, f"{name}.d", "hardening.conf"):
                DROPIN_TEMPLATE.format(lines="\n".join(NAMESPACE_HARDENING))}


def probe_hardening(run=None):
    """Whether systemd can start a unit with the manager's mount hardening here: a transient
    unit with the same properties running /bin/true (systemd-run --wait passes its exit status
    on: 226 when the mount namespace cannot be set up). (None, "") if it can, else (the exit
    status, systemd's words from the journal)."""
    run = run or run_command
    unit = f"backend-ai-manager-probe-{os.getpid()}.service"
    argv = ["systemd-run", "--wait", "--quiet", "--collect", f"--unit={unit}",
            "-p", "DefaultDependencies=no"]
    for prop in MOUNT_HARDENING + NAMESPACE_HARDENING:
        argv += ["-p", prop]
    argv += shlex.split(os.environ.get(PROBE_EXTRA, "")) + ["/bin/true"]
    result = run(argv, 60)
    if result.ok:
        return None, ""
    words = result.err.strip() or result.out.strip()
    journal = run(["journalctl", "-u", unit, "-o", "cat", "--no-pager", "-n", "20"], 15)
    found = [line.strip() for line in journal.out.splitlines() if "Failed" in line and (
        "namespac" in line or "step" in line)]
    return result.code, "\n".join(found or [words or f"exit status {result.code}"])


def _read_bytes(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def _systemctl(*args):
    result = run_command(["systemctl", *args], 120)
    if not result.ok:
        raise SystemdError(f"systemctl {' '.join(args)}: {result.message()}")
    return result.out.strip()


def install_plan(role, flags, probe):
    """{path: (bytes or None to remove, mode)} of everything `install` owns for `role`."""
    unit, dropin = unit_files(role).items()
    options = "".join(f"{env}={'yes' if flags[name] is True else flags[name]}\n"
                      for name, _flag, env, _p, _h in OPTIONS
                      if name != "role" and flags.get(name) is not None)
    with open(os.path.abspath(__file__), "rb") as f:
        manager = f.read()
    return {
        os.path.join(INSTALL_LIB, "backend_ai_manager.py"): (manager, 0o755),
        unit[0]: (unit[1].encode(), 0o644),
        dropin[0]: (dropin[1].encode() if probe[0] is None else None, 0o644),
        os.path.join(DEFAULTS_DIR, f"ai-{role}-manager"): (
            (f"# backend-ai-manager ({role}): written by install; the options given to it.\n"
             + options).encode(), 0o644),
    }


def install(flags, dry_run=False, out=None):
    """`install`: the manager file, the unit, its hardening drop-in where the probe passes, the
    options in /etc/default; then the unit enabled, (re)started and its /status shown. A second
    run changes nothing and says so. 0 when the manager answers."""
    out = out or sys.stdout
    settings = resolve_settings(flags, {})  # ConfigError: nothing written
    role, unit = settings.role, f"ai-{settings.role}-manager.service"
    if not os.path.isdir("/run/systemd/system"):  # sd_booted(3)
        raise ManagerError("systemd is not running on this host (no /run/systemd/system); "
                           "install sets the manager up as a systemd service")
    probe = probe_hardening()
    if probe[0] is None:
        out.write("hardening probe: passed; the namespace hardening (" +
                  ", ".join(NAMESPACE_HARDENING) + ") goes in the drop-in\n")
    else:
        namespace = " (226/NAMESPACE)" if probe[0] == 226 else ""
        out.write(
            f"hardening probe: failed with exit status {probe[0]}{namespace}:\n"
            + "".join(f"    {line}\n" for line in probe[1].splitlines())
            + "The manager is installed without " + " and ".join(NAMESPACE_HARDENING)
            + "\n(the rest of the hardening stays): systemd cannot mount a fresh /proc for "
            "the unit here.\nIn a Proxmox container this means nesting is off. To fix it, "
            "on the Proxmox host run\n    pct set <ID> --features nesting=1\nthen restart "
            "the container and run install again.\n")
    plan = install_plan(role, flags, probe)
    changed = [path for path, (data, _mode) in plan.items() if _read_bytes(path) != data]
    job = _running_job(settings) if changed and not dry_run else None
    if job:
        raise ManagerError(f"{unit} is running a job ({job}); install would restart it: run "
                           "install again when it is over")
    for path in changed:
        data, mode = plan[path]
        what = "remove" if data is None else "write"
        out.write(f"{'would ' if dry_run else ''}{what} {path}\n")
        if dry_run and data is not None and not path.endswith(".py"):
            out.write("".join(f"    {line}\n" for line in data.decode().splitlines()))
        if dry_run:
            continue
        if data is None:
            _remove(path)
            with contextlib.suppress(OSError):
                os.rmdir(os.path.dirname(path))  # the drop-in folder, if now empty
        else:
            _write_file(path, data, mode)
    if dry_run:
        out.write("nothing would change\n" if not changed else "dry run: nothing written\n")
        return 0
    active = run_command(["systemctl", "is-active", unit], 30).out.strip()
    enabled = run_command(["systemctl", "is-enabled", unit], 30).out.strip()
    if not changed and active == "active" and enabled == "enabled":
        out.write(f"nothing to change: {unit} is installed, enabled and running\n")
    else:
        if changed:
            _systemctl("daemon-reload")
        if enabled != "enabled":
            _systemctl("enable", unit)
        # start waits for READY=1 (Type=notify); restart picks up changed files.
        _systemctl("restart" if changed and active == "active" else "start", unit)
        out.write(f"{unit}: enabled and running\n")
    return _show_installed(settings, out)


def _local_client(settings):
    host = "127.0.0.1" if settings.bind in ("0.0.0.0", "::", "") else settings.bind
    return Client(f"[{host}]:{settings.port}" if ":" in host else f"{host}:{settings.port}",
                  settings.token_file, False)


def _running_job(settings):
    """What the manager already running on this host is doing, if it runs an update, a
    rollback or a rollout (None if it is idle or does not answer)."""
    try:
        record = _local_client(settings).call("GET", "/update")
    except ClientError:
        return None
    rollout = (record.get("agents") or {}).get("state")
    if record.get("state") in WORKING_STATES or rollout in ("pending", "rolling"):
        return f"{record.get('action') or 'update'} to {record.get('version')}: " \
               f"{record.get('state')}" + (f", rollout {rollout}" if rollout else "")
    return None


def _show_installed(settings, out):
    try:
        answer = _local_client(settings).call("GET", "/status")
    except ClientError as e:
        out.write(f"the manager does not answer: {e.message}\n")
        return 1
    out.write("".join(f"  {line}\n" for line in describe_status(answer)))
    return 0


def uninstall(role, out=None):
    """`uninstall`: the unit stopped and disabled; what `install` wrote removed (the manager file
    only when no other role's unit uses it); the state dir left, and said where."""
    out = out or sys.stdout
    unit = f"ai-{role}-manager.service"
    defaults = os.path.join(DEFAULTS_DIR, f"ai-{role}-manager")
    state_dir = f"/var/lib/backend-ai-manager/{role}"
    for line in (_read_bytes(defaults) or b"").decode("utf-8", "replace").splitlines():
        if line.startswith("BACKEND_AI_STATE_DIR="):
            state_dir = line.partition("=")[2].strip()
    paths = list(unit_files(role)) + [defaults]
    other = "agent" if role == "hub" else "hub"
    if not os.path.exists(os.path.join(UNIT_DIR, f"ai-{other}-manager.service")):
        paths.append(os.path.join(INSTALL_LIB, "backend_ai_manager.py"))
    present = [p for p in paths if os.path.lexists(p)]
    if present:
        run_command(["systemctl", "disable", "--now", unit], 120)
        for path in present:
            _remove(path)
            out.write(f"removed {path}\n")
        for folder in (os.path.join(UNIT_DIR, f"{unit}.d"), INSTALL_LIB):
            with contextlib.suppress(OSError):
                os.rmdir(folder)
        _systemctl("daemon-reload")
        run_command(["systemctl", "reset-failed", unit], 30)
    else:
        out.write(f"nothing to remove: {unit} is not installed\n")
    out.write(f"the state dir {state_dir} is left in place (its backups and job records); "
              "remove it by hand if it is no longer wanted\n")
    return 0


class StateDirLocked(ManagerError):
    """Another manager runs on this state dir."""


def lock_state_dir(state_dir):
    """Take STATE/lock (flock(2), exclusive) for as long as this process lives, and write our
    PID in it; returns the open descriptor. One manager per state dir: a second one would take
    the first one's live update for an interrupted one and undo it. Raises StateDirLocked
    naming the holder at once, without waiting; OSError if the state dir cannot be made."""
    import fcntl
    os.makedirs(state_dir, 0o755, exist_ok=True)
    path = os.path.join(state_dir, "lock")
    fd = _handed_lock(path)  # a manager handing over to this one passed its lock on
    if fd is None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise StateDirLocked(f"another manager (PID {holder}) holds the lock {path}: one "
                             "manager per state dir (to check settings without running one: "
                             "backend_ai_manager.py check ...)") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _handed_lock(path):
    fd = os.environ.pop(LOCK_FD_ENV, "")
    if not fd.isdigit():
        return None
    try:
        held, st = os.fstat(int(fd)), os.stat(path)
    except OSError:
        return None
    if (held.st_dev, held.st_ino) != (st.st_dev, st.st_ino):
        return None  # not our lock: leave that descriptor alone
    os.set_inheritable(int(fd), False)
    return int(fd)


def lock_holder(state_dir):
    """The PID holding STATE/lock, read from /proc/locks (None: not held). Reads only."""
    try:
        st = os.stat(os.path.join(state_dir, "lock"))
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    wanted = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in lines:
        words = line.split()
        if len(words) >= 6 and words[1] == "FLOCK" and words[5] == wanted:
            return int(words[4]) if words[4].isdigit() else None
    return None


def check(settings, out=None):
    """`check`: the settings as `serve` resolves them, where each came from, and whether a
    manager holds the state dir. Reads only; 0."""
    out = out or sys.stdout
    for name, flag, env, _parse, _help in OPTIONS:
        if name in HUB_ONLY and settings.role != "hub":
            continue
        text, origin = settings.sources[name]
        out.write(f"{flag:<25} {text if text != '' else '(none)'}  ({origin})\n")
    holder = lock_holder(settings.state_dir)
    out.write(f"settings are valid; the state dir {settings.state_dir} is "
              + (f"in use by the manager with PID {holder}\n" if holder else "not in use\n"))
    return 0


def self_test(settings):
    """`self-test`: run by a manager on a new one before handing over to it. Reads only: it
    runs here, with these settings, and reads the state dir's records and releases."""
    manager = ManagerUpdate(settings, Releases(settings.install_dir, settings.state_dir))
    manager.load()
    update = os.path.join(settings.state_dir, "update.json")
    if os.path.exists(update):
        with open(update, "rb") as f:
            json.loads(f.read())
    print(json.dumps({"version": __version__, "role": settings.role,
                      "releases": len(manager.releases.ids()),
                      "installed": installed_version_or_none(settings)}))
    return 0


def release_free_memory():
    """Give the C heap's free pages back to the system. Python compiles this file afresh at
    every start (a script has no cached bytecode), which takes about 10 MB that stay with the
    process after they are freed; malloc_trim(3) returns them (glibc only)."""
    trim = _libc_function("malloc_trim")
    if trim is not None:
        trim(0)


def raise_file_limit(settings):
    """Lift the soft open-files limit to the hard one (systemd gives 1024 by default) so that
    --max-connections can be honoured; clamp it if the hard limit is lower."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    spare = 64  # for the release download, writers, systemctl pipes, the journal
    if soft != resource.RLIM_INFINITY and settings.max_connections > soft - spare:
        log.warning("--max-connections %d is over what the open-files limit %d allows; using %d",
                    settings.max_connections, soft, max(1, soft - spare))
        return max(1, soft - spare)
    return settings.max_connections


def hand_over(path, argv, environ, lock):
    """Replace this process (same PID) with the manager at `path`: `python3 -c LAUNCH path`.
    The state dir's lock goes along (flock(2) belongs to the open file, which stays open)."""
    for handler in log.handlers:
        handler.flush()
    os.set_inheritable(lock, True)
    environ = dict(environ, **{LOCK_FD_ENV: str(lock)})
    try:
        os.execve(sys.executable, [sys.executable, "-c", LAUNCH, path] + argv, environ)
    except OSError as e:  # the next start settles it (the trial record says how far it got)
        log.error("cannot run %s: %s", path, e.strerror)
        os._exit(1)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def serve(settings, argv=("serve",)):
    """The daemon. `argv` (serve and its options) is what a hand-over runs the new file with."""
    argv = list(argv)
    # SIGTERM and SIGINT are blocked until the main thread waits for them: every other thread
    # starts with them blocked, so they reach the main thread only, and the hand-over can hold
    # them (one that comes then stays pending through exec, and the next manager stops at once).
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    setup_logging(settings.log_requests)
    systemd = Systemd(settings.service, settings.command_timeout)
    releases = Releases(settings.install_dir, settings.state_dir)
    updater = Updater(settings, systemd, releases)
    # Releases are read by the service, which may run as its own user: whatever umask the
    # manager was started with, what it writes is readable by all (the unit sets UMask=0022).
    os.umask(0o022)
    try:
        lock = lock_state_dir(settings.state_dir)  # held until the process ends
        for path in (settings.token_file, getattr(settings, "agent_token_file", "")):
            warning = path and token_file_exposed(path)
            if warning:  # after the lock: a second serve says one line, the lock's
                log.warning("%s", warning)
        stored = updater.manager.start_point(os.environ.pop(HANDOVER_ENV, None))
        if stored:
            log.info("handing over to the kept manager %s", stored)
            hand_over(stored, argv, dict(os.environ, **{HANDOVER_ENV: "start"}), lock)
        updater.recover()
    except StateDirLocked as e:
        log.error("%s", e.message)
        return 1
    except OSError as e:
        hint = ""
        if e.errno == errno.EROFS:
            hint = (" (read-only for the manager: its unit's ProtectHome=read-only covers /home, "
                    "/root and /run/user, ProtectSystem=full covers /usr, /boot and /etc; keep "
                    "the install and state dirs elsewhere, e.g. under /opt and /var/lib, or add "
                    f"ReadWritePaths={e.filename or settings.state_dir} in a drop-in)")
        log.error("cannot prepare %s: %s%s", settings.state_dir, e, hint)
        return 1
    rollout = None
    if settings.role == "hub":
        rollout = Rollout(settings)
        rollout.recover(updater.job.state, installed_version_or_none(settings))
        updater.manager.blockers.append(rollout.running)
        rollout.ended = updater.manager.offer  # the hub's own manager, after the rollout
    api = Api(settings, systemd, updater, rollout)
    try:
        server = Server(settings, api, raise_file_limit(settings))
    except OSError as e:
        log.error("cannot listen on %s:%d: %s", settings.bind, settings.port, e.strerror)
        return 1
    stop, signalled, handover = threading.Event(), threading.Event(), []

    def on_signal(*_):
        # Only sets Events: shutdown() from a signal handler deadlocks while serve_forever runs
        # in the same thread. The main thread does the stopping.
        signalled.set()
        stop.set()
    for signum in STOP_SIGNALS:
        signal.signal(signum, on_signal)
    thread = threading.Thread(target=server.serve_forever, name="http", daemon=True)
    thread.start()
    log.info("backend-ai-manager %s (%s) controls %s on %s:%d", __version__, settings.role,
             settings.service, settings.bind, settings.port)
    release_free_memory()
    # Only now: the socket listens (Type=notify). The watchdog's first ping too: after a
    # hand-over systemd counts from the old manager's last one.
    sd_notify("READY=1\nSTATUS=listening\nWATCHDOG=1")
    Watchdog(server, stop).start()

    def hand_over_to(path):  # the self-update's last step: the main thread does the exec
        server.drain(settings.command_timeout + server.WRITE_TIMEOUT)  # the longest request
        handover.append(path)
        stop.set()
        threading.Event().wait()
    updater.manager.hand_over = hand_over_to
    updater.manager.requests = lambda: server.jobs.unfinished_tasks
    updater.manager.serving()
    updater.manager.offer()  # a release carrying a newer manager may be current
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    stop.wait()
    if handover and not signalled.is_set():
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        if not signalled.is_set():  # (a handler that ran before the block has set it)
            server.shutdown(grace=5)
            sd_notify(f"RELOADING=1\nSTATUS=handing over to {handover[0]}\nWATCHDOG=1\n"
                      f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")
            failpoint("manager-handover")
            updater.manager.executing()
            failpoint("manager-exec")
            os.set_inheritable(server.listener.fileno(), True)
            signal.alarm(HANDOVER_LIMIT)  # kept through exec: a new manager that hangs ends
            hand_over(handover[0], argv, dict(os.environ, **{
                HANDOVER_ENV: "trial", LISTEN_FD_ENV: str(server.listener.fileno())}), lock)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    updater.manager.stopped()  # first: no hand-over starts after this
    log.info("stopping: finishing requests in progress")
    sd_notify("STOPPING=1")
    server.shutdown()
    server.server_close()
    if updater.busy():
        log.warning("an %s was in progress; the next start will recover it",
                    updater.job.get("action"))
    return 0


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    if args.command not in ("serve", "check", "install", "uninstall", "self-test"):
        return run_client(args)
    try:
        if args.command == "uninstall":
            return uninstall(args.role)
        if args.command == "install":
            return install(vars(args), args.dry_run)
        settings = resolve_settings(vars(args), os.environ)
    except ConfigError as e:
        print(f"backend_ai_manager.py: error: {e}", file=sys.stderr)
        return 2
    except (ManagerError, OSError) as e:
        print(f"backend_ai_manager.py {args.command}: error: {describe(e)}", file=sys.stderr)
        return 1
    if args.command == "self-test":
        return self_test(settings)
    return check(settings) if args.command == "check" else serve(
        settings, sys.argv[1:] if argv is None else argv)


# How `serve` runs: Python keeps a script's syntax tree (about 8 MB for this file) until the script
# returns, which the daemon never does; a module's tree is freed as soon as it is compiled. So the
# daemon replaces this process (same PID, environment and arguments) with one that imports this
# file as a module and runs it.
# sys.path[0] is the file's folder, as for a script (under -c it would be the working directory).
LAUNCH = ("import os, sys, importlib.util as u; sys.path[0] = os.path.dirname(sys.argv[1]); "
          "s = u.spec_from_file_location('backend_ai_manager', sys.argv[1]); "
          "m = sys.modules[s.name] = u.module_from_spec(s); s.loader.exec_module(m); "
          "sys.exit(m.main(sys.argv[2:]))")
if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        with contextlib.suppress(OSError):  # if it fails: run here, with the tree kept
            os.execv(sys.executable, [sys.executable, "-c", LAUNCH, os.path.abspath(__file__)] +
                     sys.argv[1:])
    sys.exit(main())
