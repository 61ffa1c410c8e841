"""The oracle for every claim about an update: GNU tar's extraction of the same tarball, compared
with what the manager installed, byte for byte.

    expected = gnu_tree(tarball, scratch_dir)      # GNU tar extracts it; wrapper folder stripped
    assert_same(expected, installed(install_dir, expected))

A tree is a dict {relative path: entry}, entry one of ("dir",), ("link", target) or
("file", size, sha256, executable). Standard library only.
"""

import hashlib
import os
import shutil
import stat
import subprocess

TAR = "/usr/bin/tar"


def walk(root):
    """The tree below `root`, links kept as links (never followed below the top)."""
    tree = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            tree[rel] = entry(path)
        dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]
    return tree


def entry(path):
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        return ("link", os.readlink(path))
    if stat.S_ISDIR(st.st_mode):
        return ("dir",)
    if stat.S_ISREG(st.st_mode):
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return ("file", st.st_size, h.hexdigest(), bool(st.st_mode & 0o111))
    return ("special", stat.S_IFMT(st.st_mode))


def release_root(folder):
    """The release root inside an extraction: the one wrapping folder (`npm pack` writes
    'package/'), or the folder itself."""
    names = os.listdir(folder)
    if len(names) == 1 and names[0] != "package.json" and \
            os.path.isdir(os.path.join(folder, names[0])) and \
            not os.path.islink(os.path.join(folder, names[0])):
        return os.path.join(folder, names[0])
    return folder


def gnu_extract(tarball, dest):
    """Extract `tarball` (any compression GNU tar detects) into the new folder `dest` with GNU
    tar; return the release root inside it."""
    os.makedirs(dest)
    gnu_extract_into(tarball, dest)
    return release_root(dest)


def gnu_extract_into(tarball, dest):
    """Extract `tarball` with GNU tar into the existing folder `dest`, wrapper folder and all
    (as an operator installing by hand would)."""
    subprocess.run([TAR, "-xf", tarball, "-C", dest, "--no-same-owner"], check=True,
                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def gnu_tree(tarball, scratch):
    """The release tree GNU tar extracts from `tarball` (scratch is removed afterwards)."""
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        return walk(gnu_extract(tarball, scratch))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def installed(install_dir, names):
    """What the service sees through the install dir for the release's top-level `names` (an
    iterable, or a tree whose top-level names are taken): each top entry is followed to what
    it points at (the manager's install links), everything below is walked as it is."""
    top = sorted({n.split(os.sep)[0] for n in names})
    tree = {}
    for name in top:
        path = os.path.join(install_dir, name)
        if not os.path.lexists(path):
            continue
        real = os.path.realpath(path)
        if not os.path.exists(path):
            tree[name] = ("dangling", os.readlink(path))
            continue
        if os.path.isdir(real):
            tree[name] = ("dir",)
            for rel, value in walk(real).items():
                tree[os.path.join(name, rel)] = value
        else:
            tree[name] = entry(real)
    return tree


def differences(expected, actual, most=10):
    """Up to `most` lines saying how `actual` differs from `expected`; [] when identical."""
    out = []
    for rel in sorted(set(expected) | set(actual)):
        a, b = expected.get(rel), actual.get(rel)
        if a != b:
            out.append(f"{rel}: expected {_show(a)}, got {_show(b)}")
            if len(out) >= most:
                out.append("...")
                break
    return out


def _show(value):
    if value is None:
        return "nothing"
    if value[0] == "file":
        return f"file of {value[1]} bytes sha256 {value[2][:12]} exec={value[3]}"
    return repr(value)


def assert_same(expected, actual, what="installed tree"):
    diff = differences(expected, actual)
    assert not diff, f"{what} differs from GNU tar's extraction:\n  " + "\n  ".join(diff)
    assert expected, "the expected tree is empty: nothing was compared"
