"""The README says what the code does: its settings table is the manager's list of settings, in
order, with the same variables and the right hub-only marks; the files it links exist; `--help`
of each command names the same options."""

import os
import re
import subprocess
import sys

import backend_ai_manager as bam
from support import MANAGER, REPO


def readme():
    with open(os.path.join(REPO, "README.md")) as f:
        return f.read()


def test_the_settings_table_is_the_list_of_settings():
    rows = re.findall(r"^\| `(--[a-z-]+)[^`]*` \| `(BACKEND_AI_[A-Z_]+)` \| ([^\n]*)\|$",
                      readme(), re.M)
    assert [(flag, env) for flag, env, _ in rows] == [
        (flag, env) for _name, flag, env, _parse, _help in bam.OPTIONS]
    hub_only = {flag for name, flag, *_ in bam.OPTIONS if name in bam.HUB_ONLY}
    assert {flag for flag, _env, text in rows if text.startswith("hub only")} == hub_only


def test_the_defaults_in_the_table_are_the_defaults():
    rows = dict(re.findall(r"^\| `(--[a-z-]+)[^`]*` \| `BACKEND_AI_[A-Z_]+` \| ([^\n]*)\|$",
                           readme(), re.M))
    for name, flag, *_ in bam.OPTIONS:
        default = bam.COMMON_DEFAULTS.get(name, bam.ROLES["hub"].get(name))
        if default and flag not in ("--nas-url", "--service", "--install-dir", "--bind"):
            assert re.search(rf"(^|[^0-9]){re.escape(str(default))}\b|`{re.escape(str(default))}`",
                             rows[flag]) or default in ("no", "off"), (flag, default, rows[flag])


def test_the_linked_files_exist_and_the_readme_is_an_operators():
    text = readme()
    for link in re.findall(r"\]\(([^)#]+)\)", text):
        assert os.path.exists(os.path.join(REPO, link)), link
    assert len(text.encode()) <= 25000
    assert "make test" in text and "make demo" in text


def test_every_option_is_in_the_help_of_serve_check_and_install():
    for command in ("serve", "check", "install"):
        run = subprocess.run([sys.executable, MANAGER, command, "--help"], capture_output=True,
                             text=True, timeout=30)
        assert run.returncode == 0
        for _name, flag, env, _parse, _help in bam.OPTIONS:
            assert flag in run.stdout, (command, flag)
