"""contrib/ansible/rollout.yml with a real ansible-core (in a venv of the lab: tests/ansible_env.py)
against three real agent managers from systemd/ai-agent-manager.service at 127.0.8.1-3:3081 in
the sandboxed systemd, each with its own service: --check changes nothing; a rollout in batches
[1, 25%, 100%] brings all three to V, byte for byte, the canary done before the next batch began;
a second run sends no POST; a release that crashes at start rolls the canary back, the run exits
non-zero and the later batches are sent nothing."""

import json
import os
import shutil
import subprocess

import pytest

import ansible_env
from support import Host, started_hosts

PYTHON = "/usr/bin/python3"
AGENTS = [f"127.0.8.{n}" for n in (1, 2, 3)]


@pytest.fixture(scope="module")
def ansible():
    try:
        return ansible_env.ensure()[0]
    except RuntimeError as e:
        pytest.fail(f"ansible-core is needed for this test: {e}")


@pytest.fixture(scope="module")
def agents(sandbox, nas, work_dir):
    base = os.path.join(work_dir, "ansible")
    hosts = []
    for n, address in enumerate(AGENTS, 1):
        host = Host(sandbox, os.path.join(base, f"agent{n}"), nas, python=PYTHON, settle=0.5,
                    role="agent", name=f"ansible{n}", address=address, port=3081)
        host.install_base("2.0.10")
        hosts.append(host)
    inventory = os.path.join(base, "inventory.yml")
    with open(inventory, "w") as f:
        json.dump({"managers": {"hosts": {f"agent-{n}": {"manager": f"{a}:3081"}
                                          for n, a in enumerate(AGENTS, 1)}}}, f)
    try:
        with started_hosts(hosts):
            yield hosts, inventory
    finally:
        shutil.rmtree(base, ignore_errors=True)


def playbook(ansible, inventory, version, *args):
    run = subprocess.run(
        [os.path.join(ansible, "ansible-playbook"), "-i", inventory,
         os.path.join(ansible_env.PLAYBOOK_DIR, "rollout.yml"), "-e", f"version={version}",
         "-e", json.dumps({"rollout_batches": [1, "25%", "100%"],
                           "manager_poll_interval": 1}), *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600,
        env=dict(os.environ, ANSIBLE_NOCOLOR="1", ANSIBLE_FORCE_COLOR="0"))
    return run.returncode, run.stdout


def records(hosts):
    return [host.api("GET", "/update")[1] for host in hosts]


def posts(host):
    """How many POST /update this agent's manager has answered (its journal)."""
    log = host.sandbox.run(["journalctl", "-u", host.MANAGER_UNIT, "--no-pager", "-o", "cat"])
    return log.stdout.count('"POST /update"')


def summary(out):
    lines = [line for line in out.splitlines() if "rollout of " in line]
    assert lines, out[-3000:]
    return lines[-1]


def test_check_then_rollout_then_nothing_to_do_then_a_crashing_release(ansible, agents):
    hosts, inventory = agents
    # --check: every /status read, nothing sent, exit non-zero (not every host on V).
    code, out = playbook(ansible, inventory, "2.0.11", "--check")
    assert code != 0 and "3 would_update" in summary(out), out[-3000:]
    assert [posts(h) for h in hosts] == [0, 0, 0]
    for host in hosts:
        host.assert_installed("2.0.10")
        assert host.api("GET", "/update")[1]["state"] == "idle"

    # The rollout: batches of one, in order, each agent's tree byte for byte the release.
    for host in hosts:
        host.publish("2.0.11")  # one agent release on the shared NAS (published once is enough)
        break
    code, out = playbook(ansible, inventory, "2.0.11")
    assert code == 0, out[-4000:]
    assert "succeeded: 3 hosts: 3 succeeded" in summary(out), out[-3000:]
    done = records(hosts)
    assert [r["state"] for r in done] == ["succeeded"] * 3, done
    assert all(r["rollout"] for r in done)  # the playbook's id, kept by each agent
    for earlier, later in zip(done, done[1:]):  # ISO times in UTC: comparable as text
        assert earlier["finished_at"] <= later["started_at"], (earlier, later)
    for host in hosts:
        host.assert_installed("2.0.11")
        assert host.service_info()["version"] == "2.0.11"

    # Everything on V: a second run sends no POST and exits 0.
    before = [posts(h) for h in hosts]
    assert before == [1, 1, 1]  # one POST each (and the journal count sees them)
    code, out = playbook(ansible, inventory, "2.0.11")
    assert code == 0 and "3 current" in summary(out), out[-3000:]
    assert [posts(h) for h in hosts] == before and records(hosts) == done

    # A release that exits at start: the canary rolls itself back, the run stops non-zero,
    # and the later batches are sent nothing.
    hosts[0].publish("2.0.12", crash=True)
    code, out = playbook(ansible, inventory, "2.0.12")
    assert code != 0, out[-3000:]
    line = summary(out)
    assert "halted" in line and "1 rolled_back, 2 not_started" in line, line
    first = hosts[0].api("GET", "/update")[1]
    assert first["state"] == "rolled_back" and first["version"] == "2.0.12", first
    assert f"agent-1: rolled_back, 2.0.11 -> - ({first['error'][:40]}" in out, out[-3000:]
    assert [posts(h) for h in hosts[1:]] == before[1:]  # nothing sent to batches 2 and 3
    for host in hosts:
        host.assert_installed("2.0.11")
