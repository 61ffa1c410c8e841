"""Differential test of the release extractor against GNU tar, byte for byte.

Hundreds of release tarballs are generated from a fixed seed (GNU tar in every format it writes,
Python's tarfile, an `npm pack`-like package/ wrapper; boundary file sizes; long, deep, Unicode
names; empty folders, hard links, in-release symlinks, exec bits; many gzip encodings) and served
by a real HTTP NAS on loopback. tests/unpack_driver.py runs each one through the manager's own
update path (open_url -> Download -> Gunzip -> Prefetch -> Extractor) under every interpreter the
manager supports, a share of them with the buffer constants shrunk down to 1 byte, and what it
wrote must equal what GNU tar extracts from the same bytes: names, types, link targets, contents,
the executable bit (tests/trees.py). Damaged archives (gzip or tar cut short, flipped bytes,
header sizes that lie) must all be refused, and GNU tar must refuse them too (the damage is
real). A mutation test proves the comparison catches the old bug (small files read with one short
read() came out truncated at a buffer boundary).

One archive in a hundred is written by `GNU tar --format=gnu --listed-incremental`, whose headers
hold atime and ctime where ustar has its name prefix: the manager takes them for a prefix and
extracts such archives elsewhere (test_gnu_header_times_are_not_a_name_prefix is the smallest
case). Those fail until the manager checks the header's magic.

    BAM_EXACT_ARCHIVES=N   generate N valid archives instead of 300 (a long soak)
    BAM_EXACT_SEED=S       another seed (the default is fixed, so a failure reproduces)
"""

import collections
import concurrent.futures
import gzip
import io
import json
import os
import posixpath
import random
import shutil
import string
import struct
import subprocess
import tarfile
import time
import zlib

import pytest

import backend_ai_manager as bam
import trees
from conftest import INTERPRETERS, interpreter
from support import Nas

HERE = os.path.dirname(os.path.abspath(__file__))
DRIVER = os.path.join(HERE, "unpack_driver.py")
MANAGER = os.path.join(os.path.dirname(HERE), "backend_ai_manager.py")
TAR = trees.TAR

SEED = int(os.environ.get("BAM_EXACT_SEED", "271828"))
COUNT = int(os.environ.get("BAM_EXACT_ARCHIVES", "300"))

KiB, MiB = 1 << 10, 1 << 20
# The module's own values (the driver puts them back for every job that does not shrink them).
CHUNK, IN_CHUNK, SMALL = bam.CHUNK, bam.Gunzip.IN_CHUNK, bam.Extractor.SMALL
# Shrunk values; a job names only those it changes.
CHUNKS = [1, 7, 512, 4096, 65536]
IN_CHUNKS = [1, 13, 4096]
SMALLS = [0, 1, 511, 4096]
# File sizes every run must cover with the module's own constants.
BOUNDARIES = sorted({0, 1, 511, 512, 513, 64 * KiB - 1, 64 * KiB, 64 * KiB + 1,
                     SMALL - 1, SMALL, SMALL + 1, CHUNK - 1, CHUNK, CHUNK + 1})

GNU_FORMATS = ["gnu", "pax", "ustar", "oldgnu", "v7"]
TARFILE_FORMATS = {"gnu": tarfile.GNU_FORMAT, "pax": tarfile.PAX_FORMAT,
                   "ustar": tarfile.USTAR_FORMAT}
FILE_MODES = [0o644] * 6 + [0o755] * 4 + [0o600, 0o700, 0o744, 0o640, 0o711, 0o500, 0o400,
                                          0o604, 0o610, 0o601, 0o777, 0o666, 0o000]
DIR_MODES = [0o755] * 10 + [0o700, 0o750, 0o775, 0o555, 0o711, 0o600]
if os.geteuid() != 0:  # GNU tar and the walk could not read what they made: keep u+rw(x)
    FILE_MODES = [m for m in FILE_MODES if m & 0o600 == 0o600]
    DIR_MODES = [m for m in DIR_MODES if m & 0o700 == 0o700]
WORDS = ["src", "lib", "dist", "bin", "index.js", "package.json", "README.md", "node_modules",
         ".bin", "typescript", "util", "a", "b", "x.y", "LICENSE", ".hidden", "tsconfig.json",
         "core", "test", "__init__.py", "data.bin", "schema.d.ts", "api", "routes.js", "@scope",
         "-dash", "..dots", "...", "a.", "UPPER", "MiXeD.Case"]
ODD = ["with space", "two  spaces", "trailing space ", "x,y;z", "#hash", "%41%2F", "q?", "[br]",
       "{br}", "amp&", "quote'", 'dq"', "back\\slash", "star*", "tilde~", "eq=sign", "colon:",
       "bang!", "dollar$HOME", "semi;", "pipe|", "lt<gt>", "new\nline", "tab\there",
       "\x7fdel"]
UNICODE = ["café", "naïve", "日本語", "Ünïcødé", "emoji😀", "ελληνικά", "кириллица", "ß",
           "e\u0301", "한국어", "ﬁ-ligature"]
ALNUM = string.ascii_letters + string.digits


# --- release models ----------------------------------------------------------------------------

class Release:
    """What a release holds, before it is written as a tar by some tool."""

    def __init__(self):
        self.dirs = {}       # path -> mode; every parent of every entry is listed
        self.files = {}      # path -> (data, mode)
        self.symlinks = {}   # path -> target
        self.hardlinks = {}  # path -> a path in self.files or an earlier hard link

    def taken(self, path):
        return path in self.dirs or path in self.files or path in self.symlinks or \
            path in self.hardlinks

    def add_dir(self, path, mode):
        parts = path.split("/")
        for i in range(1, len(parts) + 1):
            self.dirs.setdefault("/".join(parts[:i]), 0o755)
        self.dirs[path] = mode

    def size(self):
        return sum(len(d) for d, _ in self.files.values())


class Limits:
    """What a tar format can hold, for names stored as `prefix` + path ('/' behind a folder's):
    ustar splits a name over 100 bytes at a '/' into at most 155 + 100 bytes, and keeps link
    targets to 100 bytes (as GNU tar and tarfile both do); v7 holds 99 bytes."""

    def __init__(self, kind, prefix=""):
        self.kind = kind  # "long", "ustar" or "v7"
        self.prefix = prefix

    def name(self, path, is_dir=True):
        stored = (self.prefix + path + ("/" if is_dir else "")).encode("utf-8",
                                                                      "surrogateescape")
        if self.kind == "long":
            return len(stored) <= 1600
        if self.kind == "v7":
            return len(stored) <= 99
        if len(stored) <= 100:
            return True
        for i, byte in enumerate(stored):
            if byte == ord("/") and i <= 155 and 0 < len(stored) - i - 1 <= 100:
                return True
        return False

    def target(self, target):
        encoded = target.encode("utf-8", "surrogateescape")
        return len(encoded) <= (1000 if self.kind == "long" else 100)

    def hard_target(self, path):
        return self.target(self.prefix + path)


def boundary_path(rng, limits):
    """A path whose stored name is 98-102, 155-157 or 254-257 bytes long: the edges of the
    100-byte name field, the 155-byte ustar prefix and their sum."""
    total = rng.choice([98, 99, 100, 101, 102, 155, 156, 157, 254, 255, 256, 257])
    length = total - len(limits.prefix.encode())
    if length < 5:
        return None
    if length <= 250 and rng.random() < 0.4:
        return "b" * length
    name = min(100, length - 2) if rng.random() < 0.6 else rng.randint(1, min(100, length - 2))
    folder = length - name - 1
    parts = []
    while folder > 0:
        part = min(folder, 200)
        if folder - part == 1:  # no empty component
            part -= 1
        parts.append("q" * part)
        folder -= part + 1
    return "/".join(parts + ["n" * name])


def component(rng, long_ok):
    r = rng.random()
    if r < 0.45:
        name = rng.choice(WORDS)
    elif r < 0.72:
        name = "".join(rng.choice(ALNUM + "-_.") for _ in range(rng.randint(1, 24)))
    elif r < 0.82:
        name = rng.choice(UNICODE)
    elif r < 0.90:
        name = rng.choice(ODD)
    elif r < 0.92:
        name = "raw\udcff\udcfe-bytes"  # not UTF-8 on disk (surrogateescape)
    elif long_ok:
        name = "long-" + "".join(rng.choice(ALNUM) for _ in range(rng.randint(60, 245)))
    else:
        name = "".join(rng.choice(ALNUM) for _ in range(rng.randint(20, 60)))
    if name in (".", ".."):
        name += "x"
    return name


_TEXT = []


def text_pool():
    """512 KiB of source-like text, the same in every run."""
    if not _TEXT:
        rng = random.Random("text pool")
        words = ["function", "return", "const", "import", "export", "default", "async", "await",
                 "module", "require", "=>", "{", "}", "(", ")", ";", "string", "number", "null",
                 "undefined", "true", "false", "this", "class", "extends", "new", "if", "else"]
        words += ["".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 10)))
                  for _ in range(500)]
        lines, size = [], 0
        while size < 512 * KiB:
            line = " " * rng.choice([0, 2, 4, 8]) + " ".join(
                rng.choice(words) for _ in range(rng.randint(1, 12))) + "\n"
            lines.append(line)
            size += len(line)
        _TEXT.append("".join(lines).encode())
    return _TEXT[0]


def content(rng, kind, n):
    if kind == "random":
        return rng.randbytes(n)
    if kind == "zeros":
        return bytes(n)
    if kind == "pattern":
        return (bytes(range(256)) * (n // 256 + 1))[:n]
    pool = text_pool()
    out = bytearray(f"// {rng.getrandbits(64):016x}\n".encode())
    offset = rng.randrange(len(pool))
    while len(out) < n:
        out += pool[offset:offset + n - len(out)]
        offset = 0
    return bytes(out[:n])


def content_kind(rng):
    return rng.choices(["random", "text", "zeros", "pattern"], [45, 40, 8, 7])[0]


def budget_for(constants, rng):
    """Uncompressed file bytes an archive may hold: tiny buffers make a byte cost microseconds."""
    chunk, in_chunk = constants.get("chunk"), constants.get("in_chunk")
    if chunk == 1:
        return 2 * KiB
    if chunk == 7:
        return 16 * KiB
    if in_chunk == 1:
        return 16 * KiB
    if chunk == 512 or in_chunk == 13:
        return 300 * KiB
    if constants:
        return 700 * KiB
    return rng.choices([48 * KiB, 160 * KiB, 400 * KiB], [35, 40, 25])[0]


def boundary_for(index):
    """The boundary size archive `index` (one run with the module's constants) must hold, so
    that every 60 archives cover them all: CHUNK and SMALL +-1 in turn, the others in between."""
    slot = index % 60
    if slot in (0, 20, 40):
        return CHUNK - 1 + slot // 20
    if slot in (10, 30, 55):
        return SMALL - 1 + slot // 20
    small = [b for b in BOUNDARIES if b < SMALL - 1]
    return small[index % len(small)]


def max_cost(constants):
    """Seconds an archive with shrunk constants may take in the driver, about (with CHUNK=1 the
    smallest tar, one header and the end marker, costs 0.08 s)."""
    return 0.12 if constants.get("chunk") == 1 else 0.05


def job_cost(raw, compressed, constants):
    """What an archive costs the pipeline, about: some 15 us per read of the download and 30 us
    per piece handed from gunzip to the extractor (measured with CHUNK and IN_CHUNK 1)."""
    chunk = constants.get("chunk", CHUNK)
    in_chunk = min(constants.get("in_chunk", IN_CHUNK), chunk)
    return compressed / in_chunk * 15e-6 + raw / chunk * 30e-6


def size_menu(constants):
    menu = {0, 1, 2, 511, 512, 513, 1023, 1024, 1025, 10239, 10240, 10241}
    menu |= {64 * KiB - 1, 64 * KiB, 64 * KiB + 1, SMALL - 1, SMALL, SMALL + 1,
             CHUNK - 1, CHUNK, CHUNK + 1}
    for value in constants.values():
        menu |= {value - 1, value, value + 1, 2 * value - 1, 2 * value + 1}
    return sorted(v for v in menu if v >= 0)


def pick_size(rng, menu, left):
    r = rng.random()
    fitting = [v for v in menu if v <= left]
    if r < 0.5 and fitting:
        return rng.choice(fitting)
    if r < 0.8:
        return rng.randint(0, max(0, min(4096, left)))
    return min(left, int(2 ** rng.uniform(0, 18.2)))


def ancestors(path):
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def can_hold(rel, path):
    """True if `path` can be added as a leaf: no parent of it is a file or a link."""
    parts = path.split("/")
    for i in range(1, len(parts)):
        parent = "/".join(parts[:i])
        if parent in rel.files or parent in rel.symlinks or parent in rel.hardlinks:
            return False
    return path not in rel.dirs


def make_release(rng, limits, constants, budget, big=None, links=True, empty_dirs=True,
                 files=None, scale=1.0, boundary=None):
    """A random release within `budget` file bytes (`scale` < 1 makes a smaller one: fewer
    folders and files, for the shrunk constants)."""
    rel = Release()
    long_ok = limits.kind == "long"

    def new_path(parent, is_dir=False):
        for _ in range(50):
            name = component(rng, long_ok)
            path = f"{parent}/{name}" if parent else name
            if not rel.taken(path) and limits.name(path, is_dir):
                return path
        return None

    # folders, some deep, some left empty
    dirs = [""]
    folders = rng.choice([0, 1, 2, 4, 8, 12]) if budget > 4 * KiB else rng.randint(0, 2)
    for _ in range(round(folders * scale)):
        parent = rng.choice(dirs)
        depth = rng.randint(8, 40) if rng.random() < 0.12 and scale >= 0.5 else 1
        for _ in range(depth):
            if depth > 1 and rng.random() < 0.8:
                name = rng.choice(["d", "deep", "n", "0", "sub", "x.y"])
                path = f"{parent}/{name}" if parent else name
                if rel.taken(path) or not limits.name(path) or path.count("/") > 45:
                    break
            else:
                path = new_path(parent, is_dir=True)
                if path is None or path.count("/") > 45:
                    break
            rel.add_dir(path, rng.choice(DIR_MODES))
            dirs.append(path)
            parent = path
    if rng.random() < 0.2 and can_hold(rel, "node_modules/typescript/bin/tsc") and \
            can_hold(rel, "node_modules/.bin/tsc"):  # what a node release carries
        for path in ("node_modules/typescript/bin", "node_modules/.bin"):
            rel.add_dir(path, rel.dirs.get(path, 0o755))
        if not rel.taken("node_modules/typescript/bin/tsc"):
            rel.files["node_modules/typescript/bin/tsc"] = (
                b"#!/usr/bin/env node\nconsole.log('tsc')\n", 0o755)
            if links and not rel.taken("node_modules/.bin/tsc"):
                rel.symlinks["node_modules/.bin/tsc"] = "../typescript/bin/tsc"
        dirs = [""] + sorted(rel.dirs)
    # files
    menu = size_menu(constants)
    left = budget
    if files is None:
        files = rng.choices([rng.randint(1, 6), rng.randint(7, 40), rng.randint(60, 200)],
                            [40, 45, 15])[0]
        if budget <= 2 * KiB:
            files = min(files, 4)
        files = max(1, round(files * scale))
    forced = [] if boundary is None else [boundary]
    if constants:  # the sizes around the shrunk constants, in every archive that shrinks them
        for value in constants.values():
            forced += [v for v in (value - 1, value, value + 1) if 0 <= v <= budget // 4]
    for i in range(files + len(forced)):
        path = new_path(rng.choice(dirs))
        if path is None:
            continue
        size = forced[i - files] if i >= files else pick_size(rng, menu, left)
        if size > left and i < files:
            size = rng.randint(0, max(0, left))
        left -= size
        rel.files[path] = (content(rng, content_kind(rng), size), rng.choice(FILE_MODES))
        parent = posixpath.dirname(path)
        if parent:
            rel.add_dir(parent, rel.dirs.get(parent, 0o755))
    if big:
        path = new_path(rng.choice(dirs))
        if path:
            rel.files[path] = (content(rng, big[1], big[0]), rng.choice(FILE_MODES))
    for _ in range(rng.choice([0, 0, 1, 3])):
        path = boundary_path(rng, limits)
        if path and can_hold(rel, path) and not rel.taken(path) and limits.name(path, False) \
                and all(limits.name(a) for a in ancestors(path)):
            if posixpath.dirname(path):
                rel.add_dir(posixpath.dirname(path), 0o755)
            rel.files[path] = (content(rng, "text", rng.randint(0, 600)), rng.choice(FILE_MODES))
    if not empty_dirs:
        used = {posixpath.dirname(p) for p in list(rel.files) + list(rel.symlinks)}
        keep = set()
        for path in used:
            while path:
                keep.add(path)
                path = posixpath.dirname(path)
        rel.dirs = {p: m for p, m in rel.dirs.items() if p in keep}
    if links and rng.random() < scale:
        add_links(rng, rel, limits, dirs)
    return rel


def add_links(rng, rel, limits, dirs):
    dirs = [d for d in dirs if d == "" or d in rel.dirs]
    for _ in range(rng.choice([0, 0, 1, 2, 3, 5])):
        parent = rng.choice(dirs)
        name = rng.choice(["link", "ln", "tsc", "alias", "current", "l" * rng.randint(1, 90)])
        path = f"{parent}/{name}" if parent else name
        if rel.taken(path) or not limits.name(path, False):
            continue
        start = parent or "."
        r = rng.random()
        targets = list(rel.files) + [d for d in rel.dirs]
        if r < 0.55 and targets:
            target = posixpath.relpath(rng.choice(targets), start)
        elif r < 0.65:  # dangling, but inside
            target = posixpath.relpath(posixpath.join(rng.choice(dirs), "missing"), start)
        elif r < 0.80 and rel.symlinks:  # a chain through another link
            target = posixpath.relpath(rng.choice(sorted(rel.symlinks)), start)
        elif r < 0.87:
            target = rng.choice([".", "./" + name + "-other", name])  # itself: a loop
        elif targets:
            other = rng.choice(targets)
            target = "./" + posixpath.relpath(other, start) if rng.random() < 0.5 else \
                posixpath.relpath(other, start) + ("/" if other in rel.dirs else "")
        else:
            continue
        if limits.target(target):
            rel.symlinks[path] = target
    for _ in range(rng.choice([0, 0, 0, 1, 2, 3])):
        files = sorted(rel.files) + list(rel.hardlinks)  # a link to a link: the same file
        if not files:
            break
        target = rng.choice(files)
        parent = rng.choice(dirs)
        path = f"{parent}/hard-{rng.randrange(1000)}" if parent else f"hard-{rng.randrange(1000)}"
        if rel.taken(path) or not limits.name(path, False) or not limits.hard_target(target) \
                or not limits.hard_target(path):
            continue
        rel.hardlinks[path] = target


# --- writing a release as a tar ------------------------------------------------------------------

def materialize(rel, top):
    """Lay the release out on disk under `top` (for GNU tar to read)."""
    os.makedirs(top)
    for path in sorted(rel.dirs):
        os.makedirs(os.path.join(top, path), exist_ok=True)
    for path, (data, mode) in rel.files.items():
        full = os.path.join(top, path)
        with open(full, "wb") as f:
            f.write(data)
        os.chmod(full, mode)
    for path, target in rel.hardlinks.items():
        os.link(os.path.join(top, target), os.path.join(top, path))
    for path, target in rel.symlinks.items():
        os.symlink(target, os.path.join(top, path))
    # fixed times, so that GNU tar writes the same bytes in every run of a seed (files read at
    # different times, as in a real build: --listed-incremental records each one's atime)
    for n, path in enumerate(list(rel.files) + list(rel.symlinks)):
        os.utime(os.path.join(top, path), (1600000000 + 1000 * n, 1700000000),
                 follow_symlinks=False)
    for path in sorted(rel.dirs, reverse=True):
        os.chmod(os.path.join(top, path), rel.dirs[path])
        os.utime(os.path.join(top, path), (1600000000, 1700000000))


def gnu_tar(rel, scratch, fmt, method, wrap, rng, gzip_too=False, incremental=False,
            options=()):
    """The release as GNU tar writes it from a folder; returns the raw tar (or .tar.gz) bytes."""
    base = os.path.join(scratch, "src")
    shutil.rmtree(base, ignore_errors=True)
    materialize(rel, os.path.join(base, "package") if wrap else base)
    out = os.path.join(scratch, "out.tar")
    cmd = [TAR, f"--format={fmt}", *options, "-C", base, "-cf", out]
    if gzip_too:
        cmd.append("-z")
    if incremental:
        cmd += ["--listed-incremental", os.path.join(scratch, "snapshot")]
    prefix = "package/" if wrap else ""
    if method in ("dot", "dot-sorted"):
        names = None
        cmd += ["--sort=name", "."] if method == "dot-sorted" else ["."]
    elif method == "top":
        names = ["package"] if wrap else sorted(os.listdir(base))
    else:
        entries = list(rel.files) + list(rel.symlinks) + list(rel.hardlinks)
        if method == "list-all":
            entries += list(rel.dirs)
        rng.shuffle(entries)
        names = [prefix + e for e in entries]
        cmd.insert(1, "--no-recursion")
    if names is not None:
        listing = os.path.join(scratch, "names")
        with open(listing, "wb") as f:
            f.write(b"".join(n.encode("utf-8", "surrogateescape") + b"\0" for n in names))
        cmd += ["--null", "--verbatim-files-from", "-T", listing]
    result = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert result.returncode == 0 and not result.stderr, \
        f"GNU tar could not write the archive: {cmd}\n{result.stderr.decode(errors='replace')}"
    with open(out, "rb") as f:
        data = f.read()
    shutil.rmtree(base, ignore_errors=True)
    os.unlink(out)
    return data


def python_tar(rel, fmt, order, wrap, dotslash, rng, aregtype=False, global_pax=False,
               npm=False, oldstyle=False):
    """The release as Python's tarfile writes it, members in the `order` asked for. `aregtype`:
    some files with the old type '\\0'; `oldstyle`: folders as '\\0' members named 'x/'."""
    prefix = ("./" if dotslash else "") + ("package/" if wrap else "")
    if npm:
        mtime, uid = 499162500, 0
    elif fmt == tarfile.USTAR_FORMAT:
        mtime, uid = rng.choice([0, 1700000000, 2 ** 33 - 1]), rng.choice([0, 1000, 2097151])
    else:  # base-256 numbers (GNU) or pax records for what octal cannot hold
        mtime = rng.choice([0, 1700000000, 2 ** 33 - 1, 2 ** 34, -2000000000])
        uid = rng.choice([0, 1000, 2097152, 2 ** 32 - 2])
    out = io.BytesIO()
    extra = {"pax_headers": {"comment": "made by test_exact_extraction",
                             "mtime": "1700000000.5"}} if global_pax else {}
    with tarfile.open(fileobj=out, mode="w", format=fmt, **extra) as tar:
        def add(name, kind, data=None, mode=0o644, link=""):
            info = tarfile.TarInfo(prefix + name if name else prefix.rstrip("/") or ".")
            info.type, info.mode, info.mtime, info.linkname = kind, mode, mtime, link
            if not npm:
                info.uid, info.gid, info.uname, info.gname = uid, uid, "build", "build"
            if oldstyle and kind == tarfile.DIRTYPE and name:
                info.type, info.name = tarfile.AREGTYPE, info.name + "/"
            if data is not None:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)

        dirs = sorted(rel.dirs)
        leaves = sorted(list(rel.files) + list(rel.symlinks))
        if order == "shuffled":
            rng.shuffle(leaves)
        if order in ("natural", "shuffled") and (dotslash or wrap):
            add("", tarfile.DIRTYPE, mode=0o755)
        if order == "natural":
            sequence = sorted([(p, "dir") for p in dirs] + [(p, "leaf") for p in leaves])
        elif order == "dirs-last":
            sequence = [(p, "leaf") for p in leaves] + [(p, "dir") for p in reversed(dirs)]
        elif order == "shuffled":
            sequence = [(p, "dir") for p in dirs] + [(p, "leaf") for p in leaves]
        else:  # "files-only": folders are implied by the members' names
            sequence = [(p, "leaf") for p in leaves]
        for path, what in sequence:
            if what == "dir":
                add(path, tarfile.DIRTYPE, mode=rel.dirs[path])
            elif path in rel.symlinks:
                add(path, tarfile.SYMTYPE, mode=0o777, link=rel.symlinks[path])
            else:
                data, mode = rel.files[path]
                if npm:
                    mode = 0o755 if mode & 0o111 else 0o644
                add(path, tarfile.AREGTYPE if aregtype and rng.random() < 0.5 else
                    tarfile.REGTYPE, data, mode)
        for path, target in rel.hardlinks.items():  # each after the one it links to
            link = prefix + target
            if not prefix.startswith("./") and rng.random() < 0.3 and (
                    fmt != tarfile.USTAR_FORMAT or len(("./" + link).encode(
                        "utf-8", "surrogateescape")) <= 100):
                link = "./" + link  # the same file, spelled otherwise
            # the link's own mode is not the file's: GNU tar and the manager keep the file's
            add(path, tarfile.LNKTYPE, mode=rng.choice(FILE_MODES), link=link)
    return out.getvalue()


# --- gzip encodings --------------------------------------------------------------------------

def gzip_custom_header(raw, rng):
    """A gzip member with the optional header fields (FEXTRA, FNAME, FCOMMENT, FHCRC)."""
    flags = rng.choice([2, 4, 8, 16, 2 | 8, 4 | 8 | 16, 2 | 4 | 8 | 16])
    head = b"\x1f\x8b\x08" + bytes([flags]) + struct.pack("<I", 1700000000) + b"\x00\x03"
    if flags & 4:
        payload = rng.randbytes(rng.randint(0, 300))
        field = b"AP" + struct.pack("<H", len(payload)) + payload
        head += struct.pack("<H", len(field)) + field
    if flags & 8:
        head += "release-é.tar".encode() + b"\0"
    if flags & 16:
        head += b"built by test_exact_extraction\0"
    if flags & 2:
        head += struct.pack("<H", zlib.crc32(head) & 0xFFFF)
    deflate = zlib.compressobj(rng.choice([1, 6, 9]), zlib.DEFLATED, -15)
    body = deflate.compress(raw) + deflate.flush()
    return head + body + struct.pack("<II", zlib.crc32(raw), len(raw) & 0xFFFFFFFF)


def compress(raw, rng, how):
    kind = how[0]
    if kind == "gzip":
        return gzip.compress(raw, how[1], mtime=0)
    if kind == "gzip-program":
        return subprocess.run(["gzip", "-n", "-c", f"-{how[1]}"], input=raw, check=True,
                              stdout=subprocess.PIPE).stdout
    if kind == "zlib":
        _, level, wbits, mem, strategy = how
        z = zlib.compressobj(level, zlib.DEFLATED, 16 + wbits, mem, strategy)
        return z.compress(raw) + z.flush()
    if kind == "flushes":  # empty stored blocks and block ends at odd places
        z = zlib.compressobj(how[1], zlib.DEFLATED, 31)
        cuts = sorted(rng.randrange(len(raw) + 1) for _ in range(rng.randint(1, 40)))
        out, last = [], 0
        for cut in cuts + [len(raw)]:
            out.append(z.compress(raw[last:cut]))
            out.append(z.flush(rng.choice([zlib.Z_SYNC_FLUSH, zlib.Z_FULL_FLUSH,
                                           zlib.Z_PARTIAL_FLUSH, zlib.Z_BLOCK])))
            last = cut
        out.append(z.flush())
        return b"".join(out)
    if kind == "header":
        return gzip_custom_header(raw, rng)
    raise AssertionError(how)


def pick_compression(rng, size):
    r = rng.random()
    if r < 0.35:
        return ("gzip", rng.choice([0, 1, 6, 9] if size < 2 * MiB else [0, 1]))
    if r < 0.45:
        return ("gzip-program", rng.choice([1, 6, 9]))
    if r < 0.70:
        return ("zlib", rng.choice([0, 1, 3, 6, 9]), rng.randint(9, 15), rng.randint(1, 9),
                rng.choice([zlib.Z_DEFAULT_STRATEGY, zlib.Z_FILTERED, zlib.Z_HUFFMAN_ONLY,
                            zlib.Z_RLE, zlib.Z_FIXED]))
    if r < 0.88:
        return ("flushes", rng.choice([0, 1, 6]))
    return ("header",)


# --- the corpus ------------------------------------------------------------------------------

def constants_for(index):
    """Two archives in five run with shrunk constants, cycling so that every value is used."""
    if index % 5 not in (1, 3) or index % 100 in (7, 50):
        return {}
    k = (index // 5) * 2 + (index % 5 == 3)
    constants = {}
    # CHUNK=1 costs a tenth of a second even for the smallest tar: one archive in twelve
    chunk = [1, 7, 512, 4096, 65536, None, 7, 512, 4096, 65536, None, 7][k % 12]
    in_chunk = (IN_CHUNKS + [None])[(k // 12 + k) % 4]
    small = (SMALLS + [None])[(k // 2) % 5]
    for key, value in (("chunk", chunk), ("in_chunk", in_chunk), ("small", small)):
        if value is not None:
            constants[key] = value
    return constants or {"chunk": 4096}


def describe(spec):
    shrunk = ", ".join(f"{k}={v}" for k, v in sorted(spec["constants"].items())) or "defaults"
    return (f"{spec['id']} (seed {SEED}, index {spec['index']}): {spec['recipe']}; "
            f"gzip {spec['compression']}; constants {shrunk}")


def make_archive(index, scratch):
    """Archive number `index` of the run: (how it was made, its bytes). With shrunk constants,
    made smaller until it is cheap enough to run."""
    constants = constants_for(index)
    for attempt in range(10):
        rng = random.Random(f"{SEED}:{index}:{attempt}")
        spec, raw, tarball = _make_archive(index, scratch, rng, constants, 0.6 ** attempt)
        spec["cost"] = job_cost(raw, len(tarball), constants)
        if not constants or spec["cost"] <= max_cost(constants):
            break
    return spec, tarball


def _make_archive(index, scratch, rng, constants, scale):
    budget = int(budget_for(constants, rng) * scale)
    boundary = None if constants else boundary_for(index)
    if boundary is not None:
        budget = max(budget, boundary + 32 * KiB)
    big = None
    if index % 100 == 7:  # a few files of several MiB: zeros, random bytes, text in turn
        big = (rng.choice([2 * MiB + 1, 3 * MiB - 1, 4 * MiB + 7]),
               ["zeros", "random", "text"][index // 100 % 3])
    if index % 100 == 50:
        builder = "gnu-incremental"
    else:
        builder = rng.choices(["gnu", "tarfile", "npm"], [50, 38, 12])[0]
    wrap = builder == "npm" or rng.random() < 0.2
    gzipped = False
    if builder in ("gnu", "gnu-incremental"):
        fmt = "gnu" if builder == "gnu-incremental" else rng.choices(GNU_FORMATS,
                                                                    [30, 30, 22, 10, 8])[0]
        method = "list-files" if builder == "gnu-incremental" else rng.choice(
            ["dot", "dot-sorted", "top", "list-all", "list-files"])
        prefix = ("./" if method.startswith("dot") else "") + ("package/" if wrap else "")
        limits = Limits({"ustar": "ustar", "v7": "v7"}.get(fmt, "long"), prefix)
        rel = make_release(rng, limits, constants, budget, big, scale=scale,
                           boundary=boundary)
        gzipped = builder == "gnu" and rng.random() < 0.15 and \
            constants.get("chunk", CHUNK) > 7
        options = []
        if fmt in ("gnu", "oldgnu", "pax") and rng.random() < 0.3:  # base-256 or pax numbers
            options = [rng.choice(["--mtime=@-2000000000", "--mtime=@17179869184"]),
                       "--owner=builder:4000000", "--group=builders:4000000"]
        raw = gnu_tar(rel, scratch, fmt, method, wrap, rng, gzip_too=gzipped,
                      incremental=builder == "gnu-incremental", options=options)
        recipe = f"GNU tar --format={fmt}" + (" --listed-incremental" if
                                              builder == "gnu-incremental" else "") + \
            "".join(f" {o}" for o in options) + f", {method}" + \
            (", wrapped in package/" if wrap else "")
    elif builder == "tarfile":
        name = rng.choice(sorted(TARFILE_FORMATS))
        order = rng.choice(["natural", "dirs-last", "shuffled", "files-only"])
        dotslash = rng.random() < 0.3
        prefix = ("./" if dotslash else "") + ("package/" if wrap else "")
        limits = Limits("ustar" if name == "ustar" else "long", prefix)
        rel = make_release(rng, limits, constants, budget, big,
                           empty_dirs=order != "files-only", scale=scale,
                           boundary=boundary)
        aregtype = rng.random() < 0.2
        oldstyle = order != "files-only" and rng.random() < 0.15
        global_pax = name == "pax" and rng.random() < 0.3
        raw = python_tar(rel, TARFILE_FORMATS[name], order, wrap, dotslash, rng, aregtype,
                         global_pax, oldstyle=oldstyle)
        recipe = f"tarfile {name.upper()}_FORMAT, {order}" + \
            (", './' names" if dotslash else "") + \
            (", some AREGTYPE files" if aregtype else "") + \
            (", folders as AREGTYPE 'x/'" if oldstyle else "") + \
            (", global pax header" if global_pax else "") + \
            (", wrapped in package/" if wrap else "")
    else:
        name = rng.choice(["ustar", "pax"])
        rel = make_release(rng, Limits("ustar" if name == "ustar" else "long", "package/"),
                           constants, budget, big, links=False, empty_dirs=False, scale=scale,
                           boundary=boundary)
        raw = python_tar(rel, TARFILE_FORMATS[name], "files-only", True, False, rng, npm=True)
        recipe = f"npm pack style (files only, package/, tarfile {name.upper()}_FORMAT)"
    if not gzipped and (constants.get("chunk", CHUNK) <= 7 or rng.random() < 0.1):
        # a tar that ends right after its end marker, without the padding to a 10 KiB record
        # (and cheap: with CHUNK=1, every byte is a piece handed from thread to thread)
        raw = raw[:tar_layout(raw)[1] + 1024]
        recipe += ", record padding cut after the end marker"
    if gzipped:
        how, tarball, raw = ("tar -z",), raw, gzip.decompress(raw)
    else:
        how = pick_compression(rng, len(raw))
        tarball = compress(raw, rng, how)
    spec = {"id": f"v{index:05d}", "index": index, "recipe": recipe, "constants": constants,
            "compression": " ".join(str(x) for x in how), "builder": builder,
            "members": len(rel.files) + len(rel.symlinks) + len(rel.hardlinks),
            "hardlinks": len(rel.hardlinks), "symlinks": len(rel.symlinks)}
    return spec, len(raw), tarball


def gnu_oracle(tarball_path, scratch):
    """(tree, release root) as GNU tar extracts `tarball_path`."""
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        root = trees.gnu_extract(tarball_path, scratch)
        rel = os.path.relpath(root, scratch)
        return trees.walk(scratch), "" if rel == "." else rel
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def publish(nas_root, version, tarball):
    folder = os.path.join(nas_root, version)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"hub-{version}.tar.gz")
    with open(path, "wb") as f:
        f.write(tarball)
    return path


# --- damaged archives ------------------------------------------------------------------------

def tar_layout(raw):
    """[(header offset, type, size, data offset)] of every 512-byte header block of a tar, and
    the offset of its end marker. Extended headers (pax, GNU long names) are listed too."""
    headers, pos = [], 0
    while pos + 512 <= len(raw):
        block = raw[pos:pos + 512]
        if block == bytes(512):
            return headers, pos
        size = bam._tar_number(block[124:136])
        kind = block[156:157]
        headers.append((pos, kind, size, pos + 512))
        pos += 512 + (-(-size // 512) * 512 if kind not in (tarfile.SYMTYPE, tarfile.LNKTYPE,
                                                            tarfile.DIRTYPE) else 0)
    raise AssertionError("no end marker in the generated tar")


def with_size(raw, header, size):
    """`raw` with the size field of the header at offset `header` set to `size` and the header
    checksum recomputed: a header that lies, but is well formed."""
    block = bytearray(raw[header:header + 512])
    block[124:136] = b"%011o\0" % size
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return raw[:header] + bytes(block) + raw[header + 512:]


def damage_base(index, scratch):
    """A valid release whose files are all random bytes (so a wrong size never lands on
    something that looks like a header), as (raw tar, recipe)."""
    rng = random.Random(f"{SEED}:damage:{index}")
    rel = Release()
    rel.add_dir("dist/api", 0o755)
    rel.add_dir("empty", 0o755)
    long_name = "dist/" + "n" * 120 + ".js"
    sizes = [0, 1, 700, 1500, 4000, 10000, rng.randint(20000, 90000)]
    if index % 2 == 0:  # one file over SMALL: streamed, not read whole
        sizes.append(SMALL + rng.randint(1, 50 * KiB))
    for i, size in enumerate(sizes):
        path = long_name if i == 3 else f"dist/{'api/' if i % 2 else ''}f{i}.bin"
        rel.files[path] = (rng.randbytes(size), 0o755 if i == 2 else 0o644)
    rel.files["package.json"] = (rng.randbytes(1200), 0o644)
    rel.symlinks["dist/link"] = "api/f1.bin"
    rel.hardlinks["dist/hard"] = "dist/f2.bin"
    kinds = [("tarfile", "gnu"), ("tarfile", "pax"), ("gnu", "gnu"), ("gnu", "pax"),
             ("tarfile", "ustar"), ("gnu", "ustar")]
    tool, fmt = kinds[index % len(kinds)]
    wrap = index % 4 == 1
    if fmt == "ustar":
        del rel.files[long_name]
        rel.files["dist/" + "n" * 60 + "/" + "m" * 60 + ".js"] = (rng.randbytes(1500), 0o644)
        rel.add_dir("dist/" + "n" * 60, 0o755)
    if tool == "tarfile":
        raw = python_tar(rel, TARFILE_FORMATS[fmt], "natural", wrap, False, rng)
    else:
        raw = gnu_tar(rel, scratch, fmt, "dot-sorted", wrap, rng)
    return raw, f"{tool} {fmt}" + (" in package/" if wrap else "")


def damaged_archives(index, scratch):
    """[(tarball bytes, what was done, GNU tar must refuse it too)] made from base `index`."""
    rng = random.Random(f"{SEED}:damaged:{index}")
    raw, recipe = damage_base(index, scratch)
    gz = gzip.compress(raw, 6, mtime=0)
    headers, end = tar_layout(raw)
    out = []

    def regz(data):
        return gzip.compress(data, rng.choice([1, 6]), mtime=0)

    # the gzip stream cut short anywhere: header, deflate data, trailer
    cuts = [0, 1, 9, 10, 11, len(gz) // 2, len(gz) - 9, len(gz) - 8, len(gz) - 4, len(gz) - 1]
    cuts = set(rng.sample(cuts, 6)) | {rng.randrange(len(gz)) for _ in range(3)}
    for cut in sorted(cuts):
        out.append((gz[:cut], f"{recipe}: gzip cut at {cut} of {len(gz)} bytes", True))
    # the tar cut short before its end marker, then gzipped as a whole
    cuts = {0, 1, 511, 512, 513, end - 1, end}
    cuts |= {h + d for h, *_ in headers for d in (0, 100, 511, 512)}
    cuts = sorted(c for c in cuts if 0 <= c <= end)
    for cut in rng.sample(cuts, min(len(cuts), 7)) + [rng.randrange(end) for _ in range(3)]:
        # GNU tar itself takes a tar that stops at or inside a header for complete (it loses
        # the rest silently); only a cut inside a file's data is an error to it
        inside = any(data < cut < data + size for _, kind, size, data in headers
                     if kind in (tarfile.REGTYPE, tarfile.AREGTYPE))
        out.append((regz(raw[:cut]), f"{recipe}: tar cut at {cut} of {end}, re-gzipped",
                    inside))
    # a flipped byte in the gzip stream (skipped when it changes nothing zlib hands out,
    # e.g. the padding bits of the last deflate byte)
    flips = 0
    for _ in range(40):
        if flips == 8:
            break
        pos = rng.choice([10, len(gz) - 8, len(gz) - 5, len(gz) - 1, rng.randrange(10, len(gz))])
        bad = bytearray(gz)
        bad[pos] ^= rng.choice([0xFF, 1 << rng.randrange(8), rng.randrange(1, 256)])
        try:
            if zlib.decompress(bytes(bad), 16 + zlib.MAX_WBITS) == raw:
                continue
        except zlib.error:
            pass
        flips += 1
        out.append((bytes(bad), f"{recipe}: gzip byte {pos} of {len(gz)} flipped", True))
    # a flipped byte in a tar header (outside the checksum field: see below), re-gzipped
    for _ in range(8):
        header = rng.choice(headers)[0]
        pos = rng.choice([p for p in range(512) if not 148 <= p < 156])
        bad = bytearray(raw)
        bad[header + pos] ^= rng.randrange(1, 256)
        out.append((regz(bytes(bad)), f"{recipe}: tar header at {header}, byte {pos} flipped",
                    True))
    # a digit of the checksum itself changed (its NUL and space terminators are not compared)
    for _ in range(2):
        header = rng.choice(headers)[0]
        pos = header + 148 + rng.randrange(6)
        bad = bytearray(raw)
        bad[pos] ^= 1  # '0' <-> '1', ..., '6' <-> '7': still octal, another number
        out.append((regz(bytes(bad)), f"{recipe}: checksum digit at {pos} changed", True))
    # header sizes that lie, checksum recomputed: smaller (the next header is read from the
    # file's own random data) and bigger (into another file's data, or past the end)
    regular = [h for h in headers if h[1] in (tarfile.REGTYPE, tarfile.AREGTYPE)]
    data_blocks = [(d + 512 * i) for h, kind, size, d in regular for i in range(-(-size // 512))]
    for header, _, size, data in regular:
        blocks = -(-size // 512)
        if blocks >= 1 and rng.random() < 0.5:
            new_blocks = rng.randrange(blocks)
            new = rng.randint(max(0, new_blocks * 512 - 511), new_blocks * 512) if new_blocks \
                else 0
            out.append((regz(with_size(raw, header, new)),
                        f"{recipe}: size of the file at {header} says {new}, not {size}", True))
        later = [b for b in data_blocks if b > data + blocks * 512]
        if later and rng.random() < 0.5:
            landing = rng.choice(later)
            new_blocks = (landing - data) // 512
            new = rng.randint((new_blocks - 1) * 512 + 1, new_blocks * 512)
            out.append((regz(with_size(raw, header, new)),
                        f"{recipe}: size of the file at {header} says {new}, not {size} "
                        f"(into later data)", True))
    header, _, size, data = rng.choice(regular)
    new = len(raw) - data + rng.randint(1, 100000)
    out.append((regz(with_size(raw, header, new)),
                f"{recipe}: size of the file at {header} says {new}, not {size} (past the end)",
                True))
    return out, (gz, recipe)


# --- running the driver ------------------------------------------------------------------------

class Corpus:
    pass


def _build_valid(index, work):
    scratch = os.path.join(work, "build", f"v{index}")
    os.makedirs(scratch)
    try:
        spec, tarball = make_archive(index, scratch)
        path = publish(os.path.join(work, "nas"), spec["id"], tarball)
        spec["expected"], spec["root"] = gnu_oracle(path, os.path.join(scratch, "gnu"))
        spec["tarball"], spec["bytes"] = path, len(tarball)
        return spec
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _build_damaged(base, work):
    scratch = os.path.join(work, "build", f"d{base}")
    os.makedirs(scratch)
    try:
        archives, good = damaged_archives(base, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    rng = random.Random(f"{SEED}:damaged-constants:{base}")
    specs = []
    for n, (tarball, what, gnu_refuses) in enumerate(archives):
        version = f"d{base:03d}-{n:03d}"
        constants = {} if n % 5 else {"chunk": rng.choice([512, 4096, 65536]),
                                      "in_chunk": 4096, "small": rng.choice(SMALLS)}
        specs.append({"id": version, "what": what, "constants": constants,
                      "tarball": publish(os.path.join(work, "nas"), version, tarball),
                      "gnu_refuses": gnu_refuses})
    # the intact base too, served cut short by the NAS itself (Content-Length not met)
    version = f"d{base:03d}-nas"
    specs.append({"id": version, "what": f"{good[1]}: the NAS sends half and closes",
                  "constants": {}, "tarball": publish(os.path.join(work, "nas"), version,
                                                      good[0]),
                  "gnu_refuses": None, "fault": "truncate"})
    return specs


@pytest.fixture(scope="module")
def corpus(work_dir):
    work = os.path.join(work_dir, "exact")
    os.makedirs(os.path.join(work, "nas"))
    nas = Nas(os.path.join(work, "nas")).start()
    started = time.monotonic()
    workers = max(2, len(os.sched_getaffinity(0)))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        valid = list(pool.map(lambda i: _build_valid(i, work), range(COUNT)))
        bases = max(6, COUNT // 50)
        damaged = [s for specs in pool.map(lambda b: _build_damaged(b, work), range(bases))
                   for s in specs]
    for spec in damaged:
        if spec.get("fault"):
            nas.faults[nas.path_of(spec["id"])] = spec["fault"]
    c = Corpus()
    c.work, c.nas, c.valid, c.damaged = work, nas, valid, damaged
    c.build_seconds = time.monotonic() - started
    print(f"\ncorpus: {len(valid)} archives ({sum(s['bytes'] for s in valid) // KiB} KiB "
          f"compressed) and {len(damaged)} damaged ones built in {c.build_seconds:.1f} s")
    yield c
    nas.stop()


def start_driver(python, nas, specs, out_dir, manager=None):
    """Start tests/unpack_driver.py under `python` on `specs` (finish_driver waits for it)."""
    os.makedirs(out_dir)
    jobs = [{"id": s["id"], "url": nas.url_template("hub").format(version=s["id"]),
             "dest": os.path.join(out_dir, s["id"]), "timeout": 120, **s["constants"]}
            for s in specs]
    jobs_path = os.path.join(out_dir, "jobs.json")
    with open(jobs_path, "w") as f:
        json.dump({"manager": manager or MANAGER, "results": jobs_path + ".results",
                   "jobs": jobs}, f)
    with open(jobs_path + ".log", "wb") as log:
        process = subprocess.Popen([python, DRIVER, jobs_path], stdout=log, stderr=log)
    return {"process": process, "python": python, "jobs": jobs_path, "started": time.monotonic(),
            "ids": [s["id"] for s in specs]}


def finish_driver(run, timeout=None):
    """Wait for a driver started by start_driver; returns what it wrote (results in order)."""
    process = run["process"]
    try:
        process.wait(timeout or 300 + len(run["ids"]))
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise
    finally:
        run["wall"] = time.monotonic() - run["started"]
    with open(run["jobs"] + ".log", "rb") as f:
        log = f.read().decode(errors="replace")
    assert process.returncode == 0, f"the driver failed under {run['python']}:\n{log[-3000:]}"
    with open(run["jobs"] + ".results") as f:
        out = json.load(f)
    out["wall"] = run["wall"]
    assert [r["id"] for r in out["results"]] == run["ids"]
    return out


def run_driver(python, nas, specs, out_dir, manager=None):
    return finish_driver(start_driver(python, nas, specs, out_dir, manager))


def compare(spec, result, dest):
    """Lines saying how the manager's extraction differs from GNU tar's; [] if identical."""
    if not result["ok"]:
        lines = [f"refused: {result['type']}: {result['error']}"]
        if result.get("traceback"):
            lines.append(result["traceback"])
        return lines
    actual = trees.walk(dest)
    lines = trees.differences(spec["expected"], actual)
    if result["root"] != spec["root"]:
        lines.insert(0, f"release root {result['root']!r}, GNU tar's {spec['root']!r}")
    files = sum(1 for e in spec["expected"].values() if e[0] == "file")
    if result["files"] != files:
        lines.append(f"reported {result['files']} files, GNU tar extracted {files}")
    return lines


def failure_report(failures, total, what, kinds=None):
    head = f"{len(failures)} of {total} {what}"
    if kinds:
        counts = sorted(collections.Counter(kinds).items())
        head += " (by builder: " + ", ".join(f"{k} {n}" for k, n in counts) + ")"
    lines = [head + ":"]
    for name, diff in failures[:12]:
        lines.append(f"- {name}")
        lines += ["    " + line for line in diff[:8]]
    if len(failures) > 12:
        lines.append(f"... and {len(failures) - 12} more")
    return "\n".join(lines)


# --- the tests ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def drivers(corpus, request):
    """One driver per interpreter selected (and installed), all started at once on the whole
    corpus; each test below waits for its own."""
    selected = {item.callspec.params["label"] for item in request.session.items
                if getattr(item, "originalname", None) ==
                "test_extraction_is_byte_exact_and_damage_is_refused"}
    runs = {}
    for label, python in INTERPRETERS.items():
        if label in selected and os.access(python, os.X_OK):
            runs[label] = start_driver(python, corpus.nas, corpus.valid + corpus.damaged,
                                       os.path.join(corpus.work, f"out-{label}"))
    yield runs
    for run in runs.values():
        if run["process"].poll() is None:
            run["process"].kill()
            run["process"].wait()


@pytest.mark.parametrize("label", list(INTERPRETERS))
def test_extraction_is_byte_exact_and_damage_is_refused(label, corpus, drivers):
    """Every archive of the corpus through the update path under `label`: each valid one must
    come out as GNU tar extracts it, each damaged one must be refused with ReleaseError."""
    python = interpreter(label)
    out_dir = os.path.join(corpus.work, f"out-{label}")
    specs = corpus.valid + corpus.damaged
    out = finish_driver(drivers[label])
    results = dict(zip([s["id"] for s in specs], out["results"]))

    failures, kinds, compared = [], [], 0
    for spec in corpus.valid:
        dest = os.path.join(out_dir, spec["id"])
        diff = compare(spec, results[spec["id"]], dest)
        compared += 1
        if diff:
            failures.append((describe(spec), diff))
            kinds.append(spec["builder"])
        shutil.rmtree(dest, ignore_errors=True)
    accepted = []
    for spec in corpus.damaged:
        result = results[spec["id"]]
        if result["ok"]:
            accepted.append((f"{spec['id']}: {spec['what']}; constants {spec['constants']}",
                             [f"reported extracted: root {result['root']!r}, "
                              f"{result['files']} files"]))
        elif result["type"] != "ReleaseError":
            accepted.append((f"{spec['id']}: {spec['what']}; constants {spec['constants']}",
                             [f"{result['type']} instead of ReleaseError: {result['error']}",
                              result.get("traceback", "")]))
    shutil.rmtree(out_dir, ignore_errors=True)

    shrunk = sum(1 for s in corpus.valid if s["constants"])
    print(f"\n{label} (Python {out['python']}): {compared} archives compared with GNU tar "
          f"({shrunk} with shrunk constants), {len(corpus.damaged) - len(accepted)} of "
          f"{len(corpus.damaged)} damaged ones refused, "
          f"driver {out['seconds']:.1f} s, wall {out['wall']:.1f} s; slowest: " + ", ".join(
              f"{r['id']} {r['seconds']:.2f} s {r['constants']}" for r in sorted(
                  out["results"], key=lambda r: -r["seconds"])[:5]))
    message = []
    if failures:
        message.append(failure_report(failures, compared,
                                      "archives extract differently from GNU tar", kinds))
    if accepted:
        message.append(failure_report(accepted, len(corpus.damaged),
                                      "damaged archives were not refused with ReleaseError"))
    assert not message, f"under {label} ({python}):\n" + "\n\n".join(message)
    assert compared == len(corpus.valid) == COUNT >= 1
    assert len(corpus.damaged) >= 6 * 35


def test_corpus_covers_what_it_claims(corpus):
    """The generator's claims, checked on what GNU tar extracted: a generator bug that leaves out
    a kind of archive fails here instead of silently testing less."""
    if COUNT < 100:
        pytest.skip(f"BAM_EXACT_ARCHIVES={COUNT}: too few archives to cover every kind")
    assert len(corpus.valid) == COUNT
    default = [s for s in corpus.valid if not s["constants"]]
    sizes = {e[1] for s in default for e in s["expected"].values() if e[0] == "file"}
    missing = [size for size in BOUNDARIES if size not in sizes]
    assert not missing, f"no archive with the module's constants holds files of {missing} bytes"
    assert any(size >= 2 * MiB for size in sizes), "no file of several MiB"
    for key, values in (("chunk", CHUNKS), ("in_chunk", IN_CHUNKS), ("small", SMALLS)):
        used = {s["constants"].get(key) for s in corpus.valid}
        assert set(values) <= used, f"{key}: {sorted(set(values) - used)} never used"
        for value in values:  # files on the shrunk boundary, in an archive run with it
            assert any({v for v in (value - 1, value, value + 1) if v >= 0} <= {
                e[1] for e in s["expected"].values() if e[0] == "file"}
                for s in corpus.valid if s["constants"].get(key) == value), (key, value)

    def count(test):
        return sum(1 for s in corpus.valid if test(s))

    entries = [(s, rel, e) for s in corpus.valid for rel, e in s["expected"].items()]
    claims = {
        "GNU tar --format=gnu": count(lambda s: "--format=gnu" in s["recipe"]),
        "GNU tar --format=pax": count(lambda s: "--format=pax" in s["recipe"]),
        "GNU tar --format=ustar": count(lambda s: "--format=ustar" in s["recipe"]),
        "GNU tar --format=oldgnu": count(lambda s: "--format=oldgnu" in s["recipe"]),
        "GNU tar --format=v7": count(lambda s: "--format=v7" in s["recipe"]),
        "tarfile GNU_FORMAT": count(lambda s: "tarfile GNU_FORMAT" in s["recipe"]),
        "tarfile PAX_FORMAT": count(lambda s: "tarfile PAX_FORMAT" in s["recipe"]),
        "tarfile USTAR_FORMAT": count(lambda s: "tarfile USTAR_FORMAT" in s["recipe"]),
        "npm pack style": count(lambda s: s["builder"] == "npm"),
        "GNU tar base-256/pax numbers": count(lambda s: "--owner" in s["recipe"]),
        "folders as AREGTYPE 'x/'": count(lambda s: "AREGTYPE 'x/'" in s["recipe"]),
        "tar -z": count(lambda s: s["compression"] == "tar -z"),
        "no record padding": count(lambda s: "record padding cut" in s["recipe"]),
        "package/ root": count(lambda s: s["root"] == "package"),
        "hard links": count(lambda s: s["hardlinks"]),
        "symlinks": count(lambda s: any(e[0] == "link" for e in s["expected"].values())),
        "a link target over 100 bytes": count(lambda s: any(
            e[0] == "link" and len(e[1].encode("utf-8", "surrogateescape")) > 100
            for e in s["expected"].values())),
        "a name of 98-102 or 254-257 bytes": count(lambda s: any(
            len(r.encode("utf-8", "surrogateescape")) in (98, 99, 100, 101, 102, 254, 255, 256,
                                                          257) for r in s["expected"])),
        "a name over 100 bytes": count(lambda s: any(
            len(r.encode("utf-8", "surrogateescape")) > 100 for r in s["expected"])),
        "20 folders deep": count(lambda s: any(r.count("/") >= 20 for r in s["expected"])),
        "an empty folder": count(lambda s: any(
            e == ("dir",) and not any(o.startswith(r + "/") for o in s["expected"])
            for r, e in s["expected"].items())),
        "an executable file": count(lambda s: any(e[0] == "file" and e[3]
                                                  for e in s["expected"].values())),
        "a non-UTF-8 name": count(lambda s: any("\udcff" in r for r in s["expected"])),
        "gzip with header fields": count(lambda s: s["compression"] == "header"),
        "gzip with flushes": count(lambda s: s["compression"].startswith("flushes")),
        "gzip level 0 (stored)": count(lambda s: s["compression"] in ("gzip 0",)),
    }
    print("\narchives with " + ", ".join(f"{k}: {v}" for k, v in claims.items()))
    scarce = {k: v for k, v in claims.items() if v < max(2, COUNT // 150)}
    assert not scarce, f"too few archives with: {scarce}"
    assert all(s["expected"] for s in corpus.valid), "an archive extracts to nothing"
    assert entries


def test_damaged_archives_are_really_damaged(corpus):
    """GNU tar refuses the damaged archives too (so the manager's refusals are not of intact
    archives); it only accepts a tar cut at a member boundary, losing the rest silently."""
    checked, accepted = 0, []

    def gnu_lists(spec):
        return subprocess.run([TAR, "-tzf", spec["tarball"]], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL).returncode

    specs = [s for s in corpus.damaged if s["gnu_refuses"]]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        for spec, code in zip(specs, pool.map(gnu_lists, specs)):
            checked += 1
            if code == 0:
                accepted.append(f"{spec['id']}: {spec['what']}")
    assert not accepted, "GNU tar lists these 'damaged' archives without error:\n" + \
        "\n".join(accepted[:20])
    assert checked >= 6 * 25


# --- the old bug, put back: the comparison must see it -------------------------------------------

OLD_BUG = ("data = source.read_all()", "data = source.read(self.SMALL + 1)")


def straddling_release(rng, files):
    """Text files of 10-120 KB, more than 2 MiB in all: with 64 KiB of compressed input per
    read, gunzip hands out pieces of a few hundred KiB, and many files straddle two."""
    rel = Release()
    for i in range(files):
        folder = ["dist", "dist/api", "node_modules/pkg/lib", "src"][i % 4]
        rel.add_dir(folder, 0o755)
        rel.files[f"{folder}/file{i:03d}.js"] = (content(rng, "text", rng.randint(10_000,
                                                                                  120_000)), 0o644)
    return rel


def truncated(spec, dest):
    """The files the manager wrote shorter than GNU tar did, and all paths that differ."""
    actual = trees.walk(dest)
    differ = [p for p in set(spec["expected"]) | set(actual)
              if spec["expected"].get(p) != actual.get(p)]
    short = [p for p in differ if spec["expected"].get(p, ("",))[0] == "file" and
             actual.get(p, ("",))[0] == "file" and actual[p][1] < spec["expected"][p][1]]
    return short, differ


def test_the_old_short_read_bug_is_caught(corpus, tmp_path):
    """Put the old bug back (`read(SMALL + 1)`: one read, which stops at the end of the buffer
    the prefetcher holds) and the comparison with GNU tar must see it; the real module, on the
    same archives, must not differ. The shrunk constants must change what the bug does, which
    proves the driver's settings take effect."""
    python = interpreter("debian-3.11.2")
    with open(MANAGER) as f:
        source = f.read()
    assert source.count(OLD_BUG[0]) == 1, "the line the mutation replaces is not there (once)"
    mutated = os.path.join(str(tmp_path), "backend_ai_manager.py")
    with open(mutated, "w") as f:
        f.write(source.replace(OLD_BUG[0], OLD_BUG[1]))
    with open(mutated) as f:
        assert OLD_BUG[1] in f.read()

    rng = random.Random(f"{SEED}:mutation")
    scratch = os.path.join(corpus.work, "mutation")
    os.makedirs(scratch)
    specs = []
    for n, how in enumerate(["gnu", "tarfile", "package"]):
        rel = straddling_release(rng, 60)
        assert rel.size() > 2 * MiB
        if how == "gnu":
            raw = gnu_tar(rel, scratch, "gnu", "dot-sorted", False, rng)
        else:
            raw = python_tar(rel, tarfile.PAX_FORMAT, "natural", how == "package", False, rng)
        specs.append({"id": f"m{n}", "recipe": f"{rel.size()} bytes in {len(rel.files)} text "
                      f"files, {how}", "tarball": gzip.compress(raw, 6, mtime=0),
                      "constants": {}})
    # a small release (12 text files of 5-15 KB) under the module's constants and shrunk ones
    small = Release()
    for i in range(12):
        small.files[f"f{i}.txt"] = (content(rng, "text", rng.randint(5000, 15000)), 0o644)
    raw = python_tar(small, tarfile.PAX_FORMAT, "natural", False, False, rng)
    for constants in ({}, {"chunk": 4096}, {"in_chunk": 1}, {"small": 0}):
        specs.append({"id": f"s-{'-'.join(f'{k}{v}' for k, v in constants.items()) or 'default'}",
                      "recipe": f"{small.size()} bytes in 12 text files",
                      "tarball": gzip.compress(raw, 6, mtime=0), "constants": constants})
    for spec in specs:
        path = publish(os.path.join(corpus.work, "nas"), spec["id"], spec["tarball"])
        spec["expected"], spec["root"] = gnu_oracle(path, os.path.join(scratch, "gnu"))

    def run(manager, name):
        out_dir = os.path.join(scratch, name)
        out = run_driver(python, corpus.nas, specs, out_dir, manager=manager)
        found = {}
        for spec, result in zip(specs, out["results"]):
            dest = os.path.join(out_dir, spec["id"])
            found[spec["id"]] = (result, compare(spec, result, dest),
                                 truncated(spec, dest) if result["ok"] else None)
        shutil.rmtree(out_dir)
        return found

    real = run(MANAGER, "real")
    wrong = [(k, diff) for k, (_, diff, _) in real.items() if diff]
    assert not wrong, "the manager itself differs from GNU tar:\n" + \
        failure_report(wrong, len(specs), "archives")

    old = run(mutated, "mutated")
    summary = []
    for spec in specs:
        result, diff, found = old[spec["id"]]
        assert result["ok"], f"the old bug refused {spec['id']} instead: {result}"
        short, differ = found
        files = [p for p, e in spec["expected"].items() if e[0] == "file"]
        summary.append(f"{spec['id']}: {len(short)} of {len(files)} files truncated")
        assert len(short) == len(differ), f"{spec['id']}: more than truncation: {diff}"
        if spec["id"].startswith("m"):  # > 2 MiB at the module's constants: seen
            assert diff and short, f"the old bug went unnoticed on {spec['id']}: {spec['recipe']}"
        elif spec["constants"] in ({"chunk": 4096}, {"in_chunk": 1}):
            # pieces of at most 4 KiB: every file over 4 KiB straddles one and comes out short
            assert sorted(short) == sorted(p for p in files if spec["expected"][p][1] > 4096), \
                (spec["id"], short)
        elif spec["constants"] == {"small": 0}:  # every file streamed: the bug's line not run
            assert not diff, (spec["id"], diff)
        else:  # the module's constants: the first pieces hold whole files
            assert len(short) < len(files), (spec["id"], short)
    print("\nthe old bug, put back: " + "; ".join(summary))


# --- a divergence found by the corpus, kept failing until the manager is fixed ------------------

def test_gnu_header_times_are_not_a_name_prefix(corpus):
    """A GNU-format header (magic 'ustar  \\0') has no name prefix: bytes 345-368 hold the atime
    and ctime, which GNU tar writes with --listed-incremental (and other tools, e.g. .NET's tar
    writer, fill too). GNU tar ignores them for the name; a reader that takes them for a ustar
    prefix extracts 'package.json' (atime 1500000000) as '13132027400/package.json' (CPython's
    tarfile has the same bug: python/cpython#155629): the release has no package.json at its
    root. The smallest reproduction, through the whole update path."""
    python = interpreter("debian-3.11.2")
    scratch = os.path.join(corpus.work, "gnu-times")
    os.makedirs(os.path.join(scratch, "src", "dist"))
    with open(os.path.join(scratch, "src", "package.json"), "w") as f:
        f.write('{"name": "x", "version": "1.0.0"}\n')
    with open(os.path.join(scratch, "src", "dist", "server.js"), "w") as f:
        f.write("console.log('hello')\n")
    # files read at different times: each lands in another "folder", none is at the root
    os.utime(os.path.join(scratch, "src", "package.json"), (1500000000, 1700000000))
    os.utime(os.path.join(scratch, "src", "dist", "server.js"), (1600000000, 1700000000))
    tarball = os.path.join(scratch, "release.tar.gz")
    subprocess.run([TAR, "--format=gnu", "--listed-incremental",
                    os.path.join(scratch, "snapshot"), "-czf", tarball, "-C",
                    os.path.join(scratch, "src"), "package.json", "dist/server.js"], check=True)
    with gzip.open(tarball) as f:
        header = f.read(512)
    assert header[257:265] == b"ustar  \0" and header[345] != 0, "no GNU time fields written"
    with open(tarball, "rb") as f:
        publish(os.path.join(corpus.work, "nas"), "gnu-times", f.read())
    spec = {"id": "gnu-times", "constants": {}}
    spec["expected"], spec["root"] = gnu_oracle(tarball, os.path.join(scratch, "gnu"))
    assert set(spec["expected"]) == {"package.json", "dist", "dist/server.js"}
    out_dir = os.path.join(scratch, "out")
    (result,) = run_driver(python, corpus.nas, [spec], out_dir)["results"]
    diff = compare(spec, result, os.path.join(out_dir, "gnu-times"))
    assert not diff, "a GNU tar --listed-incremental release extracts elsewhere:\n  " + \
        "\n  ".join(diff)
