"""Diff and commit through the `git` program, as the caller.

git runs without a shell, with a scrubbed environment (no user or system config), and with hooks turned
off (`core.hooksPath=/dev/null`: a workspace's hooks are code nobody reviewed). A commit's author and
committer are the bkg user who asked for it. The paths a caller names are literal (`:(literal)`): `[1].txt`
is that file, not a wildcard that also matches `1.txt`.
"""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
from pathlib import Path
from typing import Any

from bkg_kernel.errors import Conflict, InvalidInput
from bkg_kernel.plugins.repoagent.workspace import git_env

MAX_DIFF_BYTES = 2_000_000
TEMP_SUFFIX = ".bkg-tmp"  # repo.write's temp files (`plugin.write`)
BINARY_SNIFF = 8000  # the bytes git looks into for a NUL (`buffer_is_binary`)
BIG_FILE = 512 * 1024 * 1024  # git's core.bigFileThreshold: a bigger file's diff is "Binary files ... differ"


def git(
    root: Path, *args: str, env: dict[str, str] | None = None, check: bool = True, stdin: bytes | None = None
) -> str:
    """Run `git args` in `root`; return stdout (422 with git's message when it fails and `check`)."""
    cmd = ["git", "-c", "core.hooksPath=/dev/null", "-c", "core.quotepath=off", "-c", "color.ui=never", *args]
    try:
        out = subprocess.run(cmd, cwd=root, capture_output=True, timeout=120, env=git_env(env, root), input=stdin)
    except subprocess.TimeoutExpired:
        raise InvalidInput(f"git {args[0]} took more than 120 s", field="workspace") from None
    if check and out.returncode != 0:
        msg = (out.stderr or out.stdout).decode(errors="replace").strip()[:2000]
        raise InvalidInput(f"git {args[0]} failed: {msg}", field="workspace")
    return out.stdout[:MAX_DIFF_BYTES].decode(errors="replace")


def literal(paths: list[str]) -> list[str]:
    """The caller's paths as pathspecs that mean those paths only (no wildcards, no magic of their own)."""
    return [f":(literal){p}" for p in paths]


def diff(root: Path, paths: list[str]) -> dict[str, Any]:
    """The working tree's changes against HEAD (staged and not), and the status of each changed file."""
    probe = subprocess.run(
        ["git", "rev-parse", "--show-object-format", "--verify", "-q", "--short", "HEAD"], cwd=root,
        capture_output=True, env=git_env(root=root), timeout=120,
    )  # fmt: skip
    has_head = probe.returncode == 0
    said = probe.stdout.decode(errors="replace").split()
    ids = _Ids("sha256" if said[:1] == ["sha256"] else "sha1", len(said[1]) if has_head and len(said) > 1 else 7)
    base = ["HEAD"] if has_head else ["--cached"]
    specs = literal(paths)
    text = git(root, "diff", "--no-ext-diff", "--no-textconv", *base, "--", *specs)
    status = git(root, "status", "--porcelain=v1", "-z", "--untracked-files=all", "--", *specs)
    files = []
    entries = iter(status.split("\0"))
    for entry in entries:
        code, name = entry[:2], entry[3:]
        if not entry or not code.strip():
            continue
        if "R" in code or "C" in code:  # `R  new\0old`: the next field is where it came from, not an entry
            moved = "renamed" if "R" in code else "copied"
            files.append({"path": name, "status": moved, "from": next(entries, "")})
            continue
        files.append({"path": name, "status": _STATUS.get(code.strip()[:1], code.strip())})
    # untracked files have no diff in `git diff`: shown whole, up to the cap, built here as `git diff --no-index
    # /dev/null <file>` prints them (one git process per file took 13 s for 3,000 files)
    untracked = [f["path"] for f in files if f["status"] == "untracked"]
    cut = False
    if untracked and len(text) < MAX_DIFF_BYTES:
        root, binary = root.resolve(), _no_diff(root, untracked)
        shown = [text.encode()]
        room = MAX_DIFF_BYTES - len(shown[0])
        for rel in untracked:
            if room <= 0:
                cut = True
                break
            part = _new_file(root, rel, rel in binary, ids, room)
            shown.append(part)
            room -= len(part)
            cut = room < 0  # its content went past the cap: cut in it
        text = b"".join(shown).decode(errors="replace")
    if cut or len(text) > MAX_DIFF_BYTES:
        text = text[:MAX_DIFF_BYTES] + f"\n[diff cut at {MAX_DIFF_BYTES} characters]\n"
    return {"diff": text, "files": files, "changed": len(files)}


_STATUS = {"M": "modified", "A": "added", "D": "deleted", "R": "renamed", "C": "copied", "?": "untracked",
           "U": "conflict", "T": "type changed"}  # fmt: skip


class _Ids:
    """How git names a blob in a diff's `index` line: the repository's hash, abbreviated as `--short` does."""

    def __init__(self, algo: str, abbrev: int) -> None:
        self.algo, self.abbrev = algo, abbrev

    def hasher(self, size: int) -> Any:
        """A hash of a blob of `size` bytes, its header fed."""
        h = hashlib.new(self.algo)
        h.update(b"blob %d\0" % size)
        return h

    def line(self, h: Any) -> bytes:
        """The `index 0000000..abcdef1` line of a new file."""
        return b"index %s..%s\n" % (b"0" * self.abbrev, h.hexdigest()[: self.abbrev].encode())


def _no_diff(root: Path, rels: list[str]) -> set[str]:
    """The files whose attributes say they are not diffed as text (`-diff`, `binary`): git honours them."""
    out = git(root, "check-attr", "-z", "--stdin", "diff", check=False, stdin="\0".join(rels).encode())
    fields = out.split("\0")
    return {fields[i] for i in range(0, len(fields) - 2, 3) if fields[i + 2] == "unset"}


_ESCAPES = {7: b"a", 8: b"b", 9: b"t", 10: b"n", 11: b"v", 12: b"f", 13: b"r", 34: b'"', 92: b"\\"}


def _label(prefix: bytes, name: bytes) -> bytes:
    """`prefix` + `name` as git writes it in a diff header with core.quotepath=off: C-style, in quotes, when it
    holds a control character, a quote or a backslash."""
    if not any(c < 0x20 or c in (0x22, 0x5C, 0x7F) for c in name):
        return prefix + name
    out = bytearray(b'"' + prefix)
    for c in name:
        out += b"\\" + _ESCAPES[c] if c in _ESCAPES else b"\\%03o" % c if c < 0x20 or c == 0x7F else bytes([c])
    return bytes(out + b'"')


def _read(root: Path, rel: str, ids: _Ids, room: int) -> tuple[bytes, Any, int, int, bytes, bool] | None:
    """An untracked file's mode, hash, size, newline count, first `room` + 1 bytes, and whether it ends with a
    newline; None for what git shows nothing of (a folder, a FIFO, a socket, a file gone meanwhile)."""
    full = root / rel
    folder = full.parent.resolve()
    if folder != root and (root not in folder.parents or ".git" in folder.relative_to(root).parts):
        return None  # a folder on its way made a link out of the workspace since git listed it: never read
    st = os.lstat(full)
    if stat.S_ISLNK(st.st_mode):  # a link is the name of its target, never what it leads to
        target = os.readlink(full).encode(errors="surrogateescape")
        h = ids.hasher(len(target))
        h.update(target)
        return b"120000", h, len(target), target.count(b"\n"), target, target.endswith(b"\n")
    if not stat.S_ISREG(st.st_mode):
        return None
    # O_NONBLOCK and fstat: a file swapped for a FIFO since the lstat is not read (its read would never end)
    with os.fdopen(os.open(full, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW), "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode):
            return None
        h, size, lines, head, last = ids.hasher(st.st_size), 0, 0, b"", b""
        # in pieces, up to the size the hash's header says: hashed and counted whole, kept up to `room` only
        while size < st.st_size and (chunk := fh.read(min(1 << 20, st.st_size - size))):
            h.update(chunk)
            lines += chunk.count(b"\n")
            head += chunk[: max(0, room + 1 - len(head))]
            last, size = chunk[-1:], size + len(chunk)
    return b"100755" if st.st_mode & stat.S_IXUSR else b"100644", h, size, lines, head, last == b"\n"


def _new_file(root: Path, rel: str, binary: bool, ids: _Ids, room: int) -> bytes:
    """The diff `git diff --no-index /dev/null <rel>` prints for an untracked file, with at most about `room` bytes
    of its content (the rest is cut anyway); b"" where git prints none."""
    try:
        found = _read(root, rel, ids, room)
    except OSError:
        return b""
    if found is None:
        return b""
    mode, h, size, lines, head, ends = found
    name = rel.encode(errors="surrogateescape")
    b = _label(b"b/", name)
    out = [b"diff --git %s %s\n" % (_label(b"a/", name), b), b"new file mode %s\n" % mode, ids.line(h)]
    if size == 0:
        return b"".join(out)
    if binary or size > BIG_FILE or b"\0" in head[:BINARY_SNIFF]:
        return b"".join([*out, b"Binary files /dev/null and %s differ\n" % b])
    count = lines + (0 if ends else 1)
    tab = b"\t" if b" " in name else b""  # git's end mark of a name with spaces, for patch readers
    out += [
        b"--- /dev/null\n",
        b"+++ %s%s\n" % (b, tab),
        b"@@ -0,0 +1%s @@\n" % (b",%d" % count if count != 1 else b""),
    ]
    shown = head.split(b"\n")
    tail = shown.pop()  # what follows the last newline: nothing, a last line without one, or a line the cap cuts
    out += [b"+" + ln + b"\n" for ln in shown]
    if tail:
        out.append(b"+" + tail + (b"" if len(head) < size else b"\n\\ No newline at end of file\n"))
    return b"".join(out)


def commit(root: Path, message: str, paths: list[str], signoff: bool, username: str) -> dict[str, Any]:
    """Stage `paths` (every change when empty) and commit them as `username`, those paths only (what else was
    staged stays staged, out of this commit); 409 when nothing changed. A message git would refuse (blank, or
    holding NUL) is a 422 before anything is staged. The files it reports are those the commit holds."""
    if not message.strip() or "\0" in message:
        raise InvalidInput("a commit message needs words, and no NUL character", field="message")
    specs = literal(paths)
    # every change but the temp file of a repo.write that was killed mid-way (`.<name>.<random>.bkg-tmp`)
    git(root, "add", "--", *specs) if paths else git(root, "add", "-A", "--", ".", f":(exclude,glob)**/*{TEMP_SUFFIX}")
    staged = git(root, "diff", "--cached", "--name-only", "-z", "--", *specs)
    if not staged.strip("\0"):
        raise Conflict("nothing to commit: the working tree has no changes in these paths", field="paths")
    who = {
        "GIT_AUTHOR_NAME": username, "GIT_AUTHOR_EMAIL": f"{username}@bkg.local",
        "GIT_COMMITTER_NAME": username, "GIT_COMMITTER_EMAIL": f"{username}@bkg.local",
    }  # fmt: skip
    only = ["--only", "--", *specs] if paths else []
    git(root, "commit", "-q", "--no-verify", "-m", message, *(["--signoff"] if signoff else []), *only, env=who)
    sha = git(root, "rev-parse", "HEAD").strip()
    # what the commit holds, from the commit itself (`--root`: the first commit of a repository too)
    fields = iter(
        git(root, "diff-tree", "-r", "-M", "--root", "--no-commit-id", "--name-status", "-z", sha).split("\0")
    )
    files = []
    for code in fields:
        if not code:
            continue
        path = next(fields, "")
        if code[:1] in ("R", "C"):  # `R100\0old\0new`: reported under its new name
            path = next(fields, "")
        files.append({"status": code, "path": path})
    return {"commit": sha, "message": message, "author": username, "files": files}
