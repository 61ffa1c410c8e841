"""ansible-core (and, for make lint, ansible-lint) in a venv of the lab: test-only tools for
contrib/ansible/, never needed by the product. `python3 tests/ansible_env.py lint` is make lint's
check of the playbook: --syntax-check, then ansible-lint if it installs cleanly."""

import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from support import LAB_ROOT  # noqa: E402

PLAYBOOK_DIR = os.path.join(os.path.dirname(HERE), "contrib", "ansible")
VENV = os.path.join(LAB_ROOT, "ansible-venv")
ANSIBLE = "ansible-core>=2.17,<2.20"  # the versions the playbook was tested with (2.19)


def _pip(*packages):
    return subprocess.run([os.path.join(VENV, "bin", "pip"), "install", "--quiet",
                           "--disable-pip-version-check", *packages],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=600)


def ensure(lint=False):
    """The venv's bin folder, with ansible-playbook (and ansible-lint if `lint` and it installs:
    else None in its place). Raises RuntimeError saying why when ansible-core cannot be had."""
    bin_dir = os.path.join(VENV, "bin")
    if not os.path.exists(os.path.join(bin_dir, "ansible-playbook")):
        os.makedirs(LAB_ROOT, 0o755, exist_ok=True)
        made = subprocess.run([sys.executable, "-m", "venv", VENV], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
        if made.returncode != 0:
            raise RuntimeError(f"cannot make a venv at {VENV}: {made.stdout.strip()}")
        run = _pip(ANSIBLE)
        if run.returncode != 0:
            raise RuntimeError(f"pip could not install {ANSIBLE}: {run.stdout.strip()[-500:]}")
    lint_path = os.path.join(bin_dir, "ansible-lint")
    if lint and not os.path.exists(lint_path):
        run = _pip("ansible-lint")
        if run.returncode != 0:
            print(f"ansible-lint did not install cleanly, not run: {run.stdout.strip()[-300:]}")
    return bin_dir, (lint_path if lint and os.path.exists(lint_path) else None)


def lint():
    bin_dir, ansible_lint = ensure(lint=True)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ.get('PATH', '')}")
    for argv in ([os.path.join(bin_dir, "ansible-playbook"), "--syntax-check", "-i",
                  "inventory.example.yml", "rollout.yml"],
                 [ansible_lint, "--nocolor", "rollout.yml"] if ansible_lint else None):
        if argv:
            run = subprocess.run(argv, cwd=PLAYBOOK_DIR, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
            print(run.stdout.strip().splitlines()[-1] if run.stdout.strip() else argv[0])
            if run.returncode != 0:
                print(run.stdout)
                return 1
    return 0


if __name__ == "__main__" and sys.argv[1:] == ["lint"]:
    sys.exit(lint())
