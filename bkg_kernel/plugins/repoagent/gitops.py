"""Diff and commit through the `git` program, as the caller.

git runs without a shell, with a scrubbed environment (no user or system config), and with hooks turned
off (`core.hooksPath=/dev/null`: a workspace's hooks are code nobody reviewed). A commit's author and
committer are the bkg user who asked for it.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from bkg_kernel.errors import Conflict, InvalidInput
from bkg_kernel.plugins.repoagent.workspace import git_env, text_lines

MAX_DIFF_BYTES = 2_000_000
TEMP_SUFFIX = ".bkg-tmp"  # repo.write's temp files (`plugin.write`)


def git(root: Path, *args: str, env: dict[str, str] | None = None, check: bool = True) -> str:
    """Run `git args` in `root`; return stdout (422 with git's message when it fails and `check`)."""
    cmd = ["git", "-c", "core.hooksPath=/dev/null", "-c", "core.quotepath=off", "-c", "color.ui=never", *args]
    try:
        out = subprocess.run(cmd, cwd=root, capture_output=True, timeout=120, env=git_env(env, root))
    except subprocess.TimeoutExpired:
        raise InvalidInput(f"git {args[0]} took more than 120 s", field="workspace") from None
    if check and out.returncode != 0:
        msg = (out.stderr or out.stdout).decode(errors="replace").strip()[:2000]
        raise InvalidInput(f"git {args[0]} failed: {msg}", field="workspace")
    return out.stdout[:MAX_DIFF_BYTES].decode(errors="replace")


def diff(root: Path, paths: list[str]) -> dict[str, Any]:
    """The working tree's changes against HEAD (staged and not), and the status of each changed file."""
    has_head = subprocess.run(
        ["git", "rev-parse", "--verify", "-q", "HEAD"], cwd=root, capture_output=True, env=git_env(root=root),
        timeout=120,
    ).returncode == 0  # fmt: skip
    base = ["HEAD"] if has_head else ["--cached"]
    text = git(root, "diff", "--no-ext-diff", "--no-textconv", *base, "--", *paths)
    status = git(root, "status", "--porcelain=v1", "-z", "--untracked-files=all", "--", *paths)
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
    for f in files:  # untracked files have no diff in `git diff`: show them whole, up to the cap
        if f["status"] == "untracked" and len(text) < MAX_DIFF_BYTES:
            text += git(root, "diff", "--no-ext-diff", "--no-textconv", "--no-index", "--", "/dev/null", f["path"],
                        check=False)  # fmt: skip
    if len(text) > MAX_DIFF_BYTES:
        text = text[:MAX_DIFF_BYTES] + f"\n[diff cut at {MAX_DIFF_BYTES} characters]\n"
    return {"diff": text, "files": files, "changed": len(files)}


_STATUS = {"M": "modified", "A": "added", "D": "deleted", "R": "renamed", "C": "copied", "?": "untracked",
           "U": "conflict", "T": "type changed"}  # fmt: skip


def commit(root: Path, message: str, paths: list[str], signoff: bool, username: str) -> dict[str, Any]:
    """Stage `paths` (every change when empty) and commit them as `username`, those paths only (what else was
    staged stays staged, out of this commit); 409 when nothing changed. A message git would refuse (blank, or
    holding NUL) is a 422 before anything is staged."""
    if not message.strip() or "\0" in message:
        raise InvalidInput("a commit message needs words, and no NUL character", field="message")
    # every change but the temp file of a repo.write that was killed mid-way (`.<name>.<random>.bkg-tmp`)
    git(root, "add", "--", *paths) if paths else git(root, "add", "-A", "--", ".", f":(exclude,glob)**/*{TEMP_SUFFIX}")
    staged = git(root, "diff", "--cached", "--name-status", "--", *paths)
    if not staged.strip():
        raise Conflict("nothing to commit: the working tree has no changes in these paths", field="paths")
    who = {
        "GIT_AUTHOR_NAME": username, "GIT_AUTHOR_EMAIL": f"{username}@bkg.local",
        "GIT_COMMITTER_NAME": username, "GIT_COMMITTER_EMAIL": f"{username}@bkg.local",
    }  # fmt: skip
    only = ["--only", "--", *paths] if paths else []
    git(root, "commit", "-q", "--no-verify", "-m", message, *(["--signoff"] if signoff else []), *only, env=who)
    sha = git(root, "rev-parse", "HEAD").strip()
    files = [{"status": ln.split("\t", 1)[0], "path": ln.split("\t")[-1]} for ln in text_lines(staged) if ln]
    return {"commit": sha, "message": message, "author": username, "files": files}
