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
    for option in bam.OPTIONS[1:]:
        flag, default = option.flag, option.default_for("hub")
        if isinstance(option.default, dict):  # one per role: both named in the row
            assert option.default["hub"] in rows[flag], flag
            assert option.default["agent"].rpartition("/")[2] in rows[flag], flag
            continue
        if default:
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


def test_no_section_uses_a_name_a_later_section_defines():
    """The file reads top-down: each section (between the `# ====` banners) uses only names
    defined in itself or in the sections above it; the module docstring lists the sections."""
    import ast
    with open(MANAGER) as f:
        source = f.read()
    lines = source.split("\n")
    opens = [n for n, line in enumerate(lines, 1) if line.startswith("# ====")][0::2]
    titles = [lines[n].split(":")[0].lstrip("# ").split()[0].lower() for n in opens]
    assert titles == ["core", "settings", "systemd", "http/1.1", "archives", "releases", "the",
                      "fleet", "server", "command"]

    def section(lineno):
        return sum(1 for n in opens if n <= lineno) - 1

    tree = ast.parse(source)
    defined = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            defined[node.name] = section(node.lineno)
        for target in getattr(node, "targets", []):
            for name in getattr(target, "elts", [target]):
                if isinstance(name, ast.Name):
                    defined[name.id] = section(node.lineno)
    later = sorted({
        (section(node.lineno), inner.id, defined[inner.id])
        for node in tree.body for inner in ast.walk(node)
        if isinstance(inner, ast.Name) and isinstance(inner.ctx, ast.Load)
        and defined.get(inner.id, -1) > section(node.lineno) >= 0})
    assert later == [], [(titles[a], name, titles[b]) for a, name, b in later]
    for word in ("core", "settings", "systemd", "wire", "archive", "releases", "update", "fleet",
                 "server", "cli"):
        assert re.search(rf"^    {word} +\S", ast.get_docstring(tree), re.M), word
