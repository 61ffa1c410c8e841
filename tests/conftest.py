"""Shared fixtures: the real systemd sandbox (session-wide) and the NAS on loopback."""

import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import nodehub  # noqa: E402
import sandbox as sandbox_mod  # noqa: E402
from support import INTERPRETERS, Nas, Running, lab_dir, remove_lab_dir  # noqa: E402,F401


def interpreter(label):
    """The path of an interpreter to run the manager with; skip if missing (fail under CI)."""
    python = INTERPRETERS[label]
    if not os.access(python, os.X_OK):
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but {python} is missing")
        pytest.skip(f"{python} is not installed")
    return python


def need_sandbox():
    """Skip with a one-line reason where a real systemd cannot be booted; under CI=true that is a
    failure, never a skip (a skipped end-to-end test must not pass CI)."""
    reason = sandbox_mod.unavailable_reason()
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but the systemd sandbox cannot run: {reason}")
        pytest.skip(reason)


@pytest.fixture(scope="session")
def work_dir():
    path = lab_dir("tests")  # under /var/lib: see support.LAB_ROOT
    yield path
    remove_lab_dir(path)


@pytest.fixture(scope="session")
def sandbox(work_dir):
    need_sandbox()
    sb = sandbox_mod.Sandbox(os.path.join(work_dir, "systemd"))
    sb.start()
    yield sb
    sb.stop()


@pytest.fixture(scope="module")
def nas(request, work_dir):
    """A NAS per test module: modules publish the same versions of different services."""
    server = Nas(os.path.join(work_dir, "nas-" + request.module.__name__)).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def node_hub(work_dir):
    """The real Node hub (tests/fixtures/node-hub), `npm ci`ed and built once per session; its
    folder is what Nas.publish_node() and Host(node=...) take. Missing node/npm skips, and under
    CI=true fails; a failed `npm ci` fails."""
    reason = nodehub.unavailable_reason()
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but the Node hub cannot be built: {reason}")
        pytest.skip(reason)
    return nodehub.prepare(work_dir)


@pytest.fixture
def srv(tmp_path):
    """A manager in this process on a port of its own, with a stand-in for systemd."""
    running = Running(tmp_path)
    yield running
    running.close()
