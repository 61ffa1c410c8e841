"""A throwaway systemd for tests: PID 1 of its own pid+mount namespace.

Standard library only, Python 3.9+. Needs root, unshare and nsenter (util-linux) and systemd.

    with Sandbox("/var/lib/backend-ai-manager-lab/t1", {"x.service": "[Service]\\nExecStart=..."}) as sb:
        sb.systemctl("start", "x.service")
        assert sb.is_active("x.service") == "active"
        print(sb.run(["journalctl", "-u", "x.service", "--no-pager"]).stdout)

Inside, /tmp, /var/tmp, /run and /var/log/journal are fresh tmpfs; every other path is the host's own
filesystem, and the network is the host's. At boot only journald runs; units under test are started by
the tests.

Run this file to self-check: python3 tests/sandbox.py
"""
import atexit
import os
import shlex
import shutil
import signal
import subprocess
import time

UNSHARE = "/usr/bin/unshare"
NSENTER = "/usr/bin/nsenter"
SYSTEMD = "/lib/systemd/systemd"
TARGET = "bam-sandbox.target"
HIDDEN = ("/tmp", "/var/tmp", "/run", "/var/log/journal")  # fresh tmpfs inside the sandbox
POWEROFF = signal.SIGRTMIN + 4  # SIGTERM does NOT stop systemd (it re-executes itself)

TARGET_TEXT = """[Unit]
Description=bam test sandbox
Wants=systemd-journald.service dbus.socket
After=systemd-journald.service dbus.socket
"""
# The system bus (systemd-run --wait needs it), without the default dependencies that would pull
# in sysinit.target, whose units act on the host's files (the sandbox shares /etc and /var).
NO_DEFAULT_DEPENDENCIES = "[Unit]\nDefaultDependencies=no\n"
BUS_DROPINS = {"dbus.socket.d/sandbox.conf": NO_DEFAULT_DEPENDENCIES,
               "dbus.service.d/sandbox.conf": NO_DEFAULT_DEPENDENCIES}

INIT_TEMPLATE = """#!/bin/sh
# PID 1 of the sandbox's new pid+mount namespace (propagation private: mounts made here stay inside).
# HAZARD: without a fresh tmpfs on /tmp, systemd-tmpfiles-setup empties the host's
# real /tmp. `set -e`: if a mount fails, stop here rather than boot systemd on the real directories.
set -e
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs -o mode=1777 tmpfs /var/tmp
mount -t tmpfs -o mode=755 tmpfs /run
# Not created when missing: that would make the host's own journald start persisting.
if [ -d /var/log/journal ]; then mount -t tmpfs -o mode=2755 tmpfs /var/log/journal; fi

# Own cgroup in every hierarchy (best effort; v1 cpuset refuses and systemd does not use it). systemd
# takes the cgroup it starts in as its root: left in the host's root cgroup, concurrent sandboxes share
# /system.slice/NAME.service (seen: one sandbox's status counting the other's tasks) and the cgroups
# systemd creates stay behind at the host's root. `echo 0` moves the writer, i.e. this shell = PID 1.
while read -r _ mnt fstype _; do
  case $fstype in cgroup|cgroup2)
    mkdir -p "$mnt/{cgroup}" 2>/dev/null && {{ echo 0 >"$mnt/{cgroup}/cgroup.procs"; }} 2>/dev/null || true
  esac
done </proc/self/mounts

# Lifeline: stdin is a pipe whose write end only the Python process holds. If that process dies without
# stop() (SIGKILL; SIGTERM skips atexit), read sees EOF and the sandbox powers off instead of lingering.
# (SIGKILL would not do: the namespace's PID 1 ignores SIGKILL sent from inside the namespace.)
exec 3<&0 </dev/null
( read -r _ <&3 || :; kill -{poweroff} 1 ) &
exec 3<&-

# Clean environment for PID 1. The trailing ':' of SYSTEMD_UNIT_PATH keeps the default unit paths
# (journald's units). HAZARD: without --unit= systemd boots multi-user.target = every installed service.
# container=: systemd then always knows it is in a container and skips units that would act on the host
# (ConditionVirtualization=!container: timesyncd setting the clock, fstrim, random-seed, repart, pstore).
# On these machines it detects that anyway, but only because the image happens to contain /.dockerenv.
exec env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin container=bam-sandbox SYSTEMD_UNIT_PATH={units}: \\
  {systemd} --system --unit={target}
"""

_live = set()  # started sandboxes, powered off at interpreter exit if a caller forgot


@atexit.register
def _stop_all():
    for sb in list(_live):
        sb.stop()


def unavailable_reason():
    """None if a sandbox can be booted here, else a one-line reason."""
    if os.geteuid() != 0:
        return "systemd sandbox needs root (euid is %d)" % os.geteuid()
    for path in (UNSHARE, NSENTER, SYSTEMD):
        if not os.access(path, os.X_OK):
            return "systemd sandbox needs %s (not found)" % path
    return None


def _children(ppid):
    """PIDs whose parent is ppid (a /proc scan; needs no CONFIG_PROC_CHILDREN)."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open("/proc/%s/stat" % name) as f:
                    # "pid (comm) state ppid ...": comm may hold spaces and ')', so split after the last ')'
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == ppid:
                        found.append(int(name))
            except (OSError, IndexError, ValueError):
                pass  # gone meanwhile
    return found


def _comm(pid):
    try:
        with open("/proc/%d/comm" % pid) as f:
            return f.read().strip()
    except OSError:
        return None


def _remove_cgroups(match):
    """rmdir the cgroup trees bam-sandbox-PID-N (see init.sh) for which match(name) is true."""
    with open("/proc/self/mounts") as f:
        mounts = [line.split()[1] for line in f if line.split()[2] in ("cgroup", "cgroup2")]
    for mnt in mounts:
        for name in os.listdir(mnt):
            if name.startswith("bam-sandbox-") and match(name):
                # Children first. rmdir of a cgroup that has processes fails: this cannot break a live one.
                for d, _, _ in os.walk(os.path.join(mnt, name), topdown=False):
                    try:
                        os.rmdir(d)
                    except OSError:
                        pass


class Sandbox:
    _count = 0

    def __init__(self, root, units=None):
        root = os.path.realpath(root)
        for hidden in HIDDEN:
            if root == hidden or root.startswith(hidden + "/"):
                raise ValueError("sandbox root %s is under %s, which the sandbox hides behind a fresh tmpfs"
                                 % (root, hidden))
        self.root = root
        self.units_dir = os.path.join(root, "units")
        self.init_script = os.path.join(root, "init.sh")
        self.log_path = os.path.join(root, "boot.log")  # unshare's and init.sh's output (systemd's: journal)
        self.units = dict(units or {})
        self.pid = None    # host PID of the sandbox's systemd = the namespace's PID 1
        self.state = None  # "running" or "degraded" once booted
        self._proc = None  # the unshare process
        self._lifeline = None  # write end of init.sh's stdin pipe
        Sandbox._count += 1
        self._cgroup = "bam-sandbox-%d-%d" % (os.getpid(), Sandbox._count)

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self, timeout=30):
        if self._proc is not None:
            raise RuntimeError("sandbox already started")
        # Leftovers of sandboxes whose Python process died without stop() (the lifeline powered them off).
        _remove_cgroups(lambda name: not os.path.exists("/proc/" + name.split("-")[2]))
        shutil.rmtree(self.units_dir, ignore_errors=True)  # no stale units from an earlier run
        os.makedirs(self.units_dir)
        self._write(TARGET, TARGET_TEXT)
        for name, text in BUS_DROPINS.items():
            self._write(name, text)
        for name, text in self.units.items():
            self._write(name, text)
        with open(self.init_script, "w") as f:
            f.write(INIT_TEMPLATE.format(units=shlex.quote(self.units_dir), systemd=SYSTEMD, target=TARGET,
                                         cgroup=self._cgroup, poweroff=int(POWEROFF)))
        os.chmod(self.init_script, 0o755)

        deadline = time.monotonic() + timeout
        lifeline_r, self._lifeline = os.pipe()
        try:
            with open(self.log_path, "wb") as log:
                self._proc = subprocess.Popen(
                    # --kill-child: should unshare die, its child (PID 1 of the namespace) is SIGKILLed,
                    # which kills everything in the namespace.
                    [UNSHARE, "--pid", "--mount", "--fork", "--kill-child", "--mount-proc",
                     "--propagation", "private", self.init_script],
                    stdin=lifeline_r, stdout=log, stderr=subprocess.STDOUT,
                    # Own session: a Ctrl-C in the terminal must not reach systemd (SIGINT = ctrl-alt-del).
                    start_new_session=True)
        except BaseException:
            os.close(self._lifeline)
            raise
        finally:
            os.close(lifeline_r)
        _live.add(self)
        try:
            self._wait_running(deadline)
        except BaseException:
            self.stop()
            raise

    def _wait_running(self, deadline):
        state = "systemd not exec'd yet"
        while True:
            if self._proc.poll() is not None:
                self._fail("sandbox exited during boot (unshare rc=%s)" % self._proc.returncode)
            if self.pid is None:
                kids = _children(self._proc.pid)
                self.pid = kids[0] if kids else None
            elif _comm(self.pid) == "systemd":  # init.sh has exec'd systemd
                try:
                    # Fails at once ("offline"/no bus) until the manager listens, then waits for the boot.
                    r = self.run(["systemctl", "is-system-running", "--wait"],
                                 timeout=max(deadline - time.monotonic(), 0.1))
                    state = ((r.stdout.strip() or r.stderr.strip()).splitlines() or ["?"])[-1]
                except subprocess.TimeoutExpired:
                    state = "is-system-running --wait timed out"
                if state in ("running", "degraded"):
                    self.state = state
                    return
            if time.monotonic() > deadline:
                self._fail("sandbox did not come up (last state: %s)" % state)
            time.sleep(0.05)

    def _fail(self, msg):
        try:
            with open(self.log_path, errors="replace") as f:
                msg += "\n--- tail of %s ---\n%s" % (self.log_path, "".join(f.readlines()[-30:]))
        except OSError:
            pass
        if self.pid is not None and _comm(self.pid) == "systemd":
            for argv in (["systemctl", "list-jobs", "--no-pager"], ["journalctl", "-n", "30", "--no-pager"]):
                try:
                    msg += "\n--- %s ---\n%s" % (" ".join(argv), self.run(argv, timeout=5).stdout)
                except Exception:
                    pass
        raise RuntimeError(msg)

    def stop(self, timeout=30):
        """Power off and wait until every process of the sandbox is gone. Idempotent."""
        proc = self._proc
        if proc is None:
            return
        try:
            deadline = time.monotonic() + timeout
            while proc.poll() is None and self.pid is not None and time.monotonic() < deadline:
                # Resent each second: a signal that arrives before systemd has installed its handlers is
                # dropped (PID 1 of a namespace ignores unhandled signals).
                try:
                    os.kill(self.pid, POWEROFF)
                    proc.wait(min(1, max(deadline - time.monotonic(), 0)))
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    pass
            if proc.poll() is None:
                # SIGKILL of the namespace's PID 1 (from outside) kills everything in it, and unshare
                # exits once all of it is gone. pid unknown (boot stuck before the fork was seen): kill
                # unshare, whose --kill-child SIGKILLs its child.
                kids = [self.pid] if self.pid is not None else _children(proc.pid)
                try:
                    os.kill(kids[0] if kids else proc.pid, signal.SIGKILL)
                    proc.wait(10)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    proc.kill()
                    proc.wait()
        finally:
            self._proc = self.pid = None
            os.close(self._lifeline)  # only now: closing it earlier would trigger init.sh's lifeline
            _live.discard(self)
            _remove_cgroups(lambda name: name == self._cgroup)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()
        return False

    # -- inside the sandbox ------------------------------------------------------------------------
    def _ns(self, argv):
        if self.pid is None:
            raise RuntimeError("sandbox is not running")
        return [NSENTER, "-t", str(self.pid), "-m", "-p", "--"] + [str(a) for a in argv]

    def run(self, argv, timeout=60, check=False, input=None, env=None):
        """Run argv inside the sandbox and wait; stdout and stderr are captured as text."""
        return subprocess.run(self._ns(argv), timeout=timeout, check=check, input=input, env=env,
                              stdin=subprocess.DEVNULL if input is None else None,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)

    def popen(self, argv, **kwargs):
        """Start argv inside the sandbox without waiting; kwargs go to subprocess.Popen."""
        return subprocess.Popen(self._ns(argv), **kwargs)

    def systemctl(self, *args):
        return self.run(["systemctl"] + list(args))

    def is_active(self, unit):
        return self.systemctl("is-active", unit).stdout.strip()

    def add_unit(self, name, text):
        """Write a unit file (allowed before start()); when running, daemon-reload so systemd sees it."""
        self.units[name] = text
        if self._proc is not None:
            self._write(name, text)
            self.run(["systemctl", "daemon-reload"], check=True)

    def _write(self, name, text):
        """A unit, or a drop-in (NAME.d/FILE.conf)."""
        os.makedirs(os.path.dirname(os.path.join(self.units_dir, name)), exist_ok=True)
        with open(os.path.join(self.units_dir, name), "w") as f:
            f.write(text)


if __name__ == "__main__":
    import sys

    def main():
        reason = unavailable_reason()
        if reason:
            return "cannot run: " + reason
        from support import lab_dir, remove_lab_dir
        root = lab_dir("selfcheck")
        t0 = time.monotonic()
        with Sandbox(root) as sb:
            print("booted in %.2fs (%s), systemd host pid %d" % (time.monotonic() - t0, sb.state, sb.pid))
            sb.add_unit("hello.service", "[Service]\nType=simple\nExecStart=/usr/bin/python3 -u -c "
                        "\"print('hello from sandbox'); import time; time.sleep(300)\"\n")
            sb.run(["systemctl", "start", "hello.service"], check=True)
            print("is-active hello.service:", sb.is_active("hello.service"))
            for _ in range(50):  # journald may need a moment
                journal = sb.run(["journalctl", "-u", "hello.service", "-n", "5", "--no-pager"]).stdout
                if "hello from sandbox" in journal:
                    break
                time.sleep(0.1)
            print(journal, end="")
            if "hello from sandbox" not in journal:
                return "FAIL: 'hello from sandbox' not in the journal"
            sb.run(["systemctl", "stop", "hello.service"], check=True)
            if sb.is_active("hello.service") != "inactive":
                return "FAIL: hello.service is %s after stop" % sb.is_active("hello.service")
            t1 = time.monotonic()
        print("powered off in %.2fs" % (time.monotonic() - t1))
        remove_lab_dir(root)
        print("OK")
        return 0

    sys.exit(main())
