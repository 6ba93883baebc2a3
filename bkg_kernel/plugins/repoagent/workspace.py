"""A workspace: a directory under one of the `repo_roots`, its files (ignore rules honoured) and confined paths.

Every path a caller names is resolved (symlinks followed) and must stay inside the workspace, else 403;
`.git/` is never written. `Bounds` keeps workspaces under the roots and off the gateway's data dir, asked again
on every call (the roots can narrow after a workspace was added). The file list comes from `git ls-files` in a
git repository (git's own `.gitignore` semantics, nested files included) and from a walk with `pathspec`
elsewhere (git's rules too: the deepest `.gitignore` that matches decides); the `ignore` setting applies to both.
"""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from bkg_kernel.errors import Forbidden, InvalidInput, NotFound, check_path_text, escaped, is_utf8

BINARY_SNIFF = 8192
LIVE = ("outside_roots", "off_limits")  # what `Workspace.to_dict` says of the workspace now: never saved
REPOS = "repos"  # <data_dir>/repos: the default root, the one part of the data dir a workspace may be in


class Bounds:
    """Where a workspace may be: under one of the repo roots, and clear of the gateway's data dir but for its
    `repos` folder. The data dir holds the admin's `workbench.key`, the store's database and every plugin's state:
    a `repo:use` caller who could add it (a root that holds it) read the key and wrote `plugins.json`."""

    def __init__(self, data_dir: Path, roots: Callable[[], list[Path]]) -> None:
        self.data_dir = data_dir.resolve()
        self.repos = self.data_dir / REPOS
        self._roots = roots  # read on each call: the plugin sets its roots after it loads its workspaces

    @property
    def roots(self) -> list[Path]:
        """The repo roots, resolved."""
        return self._roots()

    def under_roots(self, folder: Path) -> bool:
        """Whether `folder` (resolved) is a repo root or lies inside one."""
        return any(folder == r or r in folder.parents for r in self.roots)

    def near_data(self, folder: Path) -> str | None:
        """Why `folder` (resolved) may not be a workspace for the data dir's sake; None when it may (clear of the
        data dir, or in its `repos` folder)."""
        if folder == self.repos or self.repos in folder.parents:
            return None
        if folder == self.data_dir:
            where = "is the gateway's data dir"
        elif self.data_dir in folder.parents:
            where = f"is inside the gateway's data dir {self.data_dir}"
        elif folder in self.data_dir.parents:
            where = f"holds the gateway's data dir {self.data_dir}"
        else:
            return None
        return (f"{folder} {where} (its keys, database and plugins' state): no workspace may reach it, only its "
                f"{REPOS} folder may hold workspaces")  # fmt: skip

    def private(self, real: Path) -> bool:
        """Whether `real` (resolved) is one of the data dir's own files: in it, and not in its `repos` folder."""
        return real.is_relative_to(self.data_dir) and not real.is_relative_to(self.repos)


@dataclass
class Workspace:
    """One registered workspace."""

    name: str
    path: Path
    added_by: str = ""
    added_at: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)  # index status: indexed_at, files, symbols
    bounds: Bounds | None = field(default=None, repr=False, compare=False)  # None: no roots, no data dir to keep

    @property
    def outside_roots(self) -> bool:
        """Whether the workspace is no longer under a repo root (they were narrowed since it was added)."""
        return self.bounds is not None and not self.bounds.under_roots(self.path)

    def off_limits(self) -> str | None:
        """Why no call may use the workspace now, only remove it (None when it may be used): out of the roots, or
        reaching the data dir (one added before bkg refused such folders)."""
        if self.bounds is None:
            return None
        if self.outside_roots:
            roots = ", ".join(map(str, self.bounds.roots))
            return (f"workspace {self.name!r} ({self.path}) is outside the repo roots ({roots}): set repo_roots to "
                    "allow it again, or remove it")  # fmt: skip
        near = self.bounds.near_data(self.path)
        return None if near is None else f"workspace {self.name!r}: {near}; remove it"

    @property
    def git(self) -> bool:
        """Whether it is a git repository (now: a folder can become one after it was added)."""
        return (self.path / ".git").exists()

    def to_dict(self) -> dict[str, Any]:
        """Describe it as JSON (with, when it may not be used, `off_limits`: why)."""
        why = self.off_limits()
        return {
            "name": self.name,
            "path": str(self.path),
            "git": self.git,
            "added_by": self.added_by,
            "added_at": self.added_at,
            **self.info,
            "outside_roots": self.outside_roots,
            **({"off_limits": why} if why is not None else {}),
        }

    def resolve(self, rel: str, field_name: str = "path") -> Path:
        """Return the absolute path of `rel` inside the workspace; refuse anything that leaves it (403)."""
        check_path_text(rel, field_name, max_name=200)  # 200: a write's temporary name adds ~20 bytes
        if rel.startswith(("/", "\\", "~")) or PurePosixPath(rel).is_absolute():
            raise Forbidden(f"{rel!r} is absolute: paths are relative to the workspace", field=field_name)
        try:
            full = (self.path / rel).resolve()
        except (RuntimeError, OSError):  # a symlink loop (`a -> a`), which Python 3.11 raises as RuntimeError
            raise InvalidInput(f"{rel!r} is a symbolic link that leads back to itself", field=field_name) from None
        if full != self.path and self.path not in full.parents:
            raise Forbidden(f"{rel!r} leads outside the workspace {self.name!r}", field=field_name)
        if ".git" in full.relative_to(self.path).parts:  # its config holds remotes' credentials, names programs
            raise Forbidden(f"{rel!r} is in a .git folder: off limits (see repo.diff, repo.commit)", field=field_name)
        if self.bounds is not None and self.bounds.private(full):  # behind `off_limits`, which refuses such a workspace
            raise Forbidden(f"{rel!r} is one of the gateway's data dir files: off limits", field=field_name)
        return full

    def rel(self, full: Path) -> str:
        """Return the workspace-relative POSIX path of an absolute path inside it."""
        return full.relative_to(self.path).as_posix() or "."


class Ignore:
    """The `ignore` setting's patterns (gitignore syntax) plus, outside git, each folder's `.gitignore`."""

    def __init__(self, patterns: list[str]) -> None:
        import pathspec

        self.spec = pathspec.GitIgnoreSpec.from_lines(patterns)  # as git reads them, as for each .gitignore
        self.pathspec = pathspec

    def skip(self, rel: str, is_dir: bool = False) -> bool:
        """Say whether a workspace-relative path is ignored by the setting."""
        return bool(self.spec.match_file(rel + "/" if is_dir else rel))

    def walk(self, root: Path, limit: int) -> Iterator[str]:
        """Yield relative file paths under `root`, honouring nested `.gitignore` files (no symlinked folders); at most
        `limit` + 1 of them."""
        stack: list[tuple[Path, list[tuple[str, Any]]]] = [(root, [])]
        seen = 0
        while stack:
            folder, rules = stack.pop()
            gi = folder / ".gitignore"
            if gi.is_file():
                try:
                    lines = file_lines(gi)
                    rules = [
                        *rules,
                        (folder.relative_to(root).as_posix(), self.pathspec.GitIgnoreSpec.from_lines(lines)),
                    ]
                except OSError:
                    pass
            try:
                entries = sorted(os.scandir(folder), key=lambda e: e.name)
            except OSError:
                continue
            subdirs = []
            for e in entries:
                rel = (folder / e.name).relative_to(root).as_posix()
                is_dir = e.is_dir(follow_symlinks=False)
                if e.name == ".git" or self.skip(rel, is_dir) or _ignored_by(rules, rel, is_dir):
                    continue
                if is_dir:
                    subdirs.append((folder / e.name, rules))
                elif e.is_file() and (not e.is_symlink() or inside(root, rel)):
                    seen += 1
                    yield rel
                    if seen > limit:  # one past the limit, so the caller can tell a cut listing from a whole one
                        return
            stack.extend(reversed(subdirs))


def _ignored_by(rules: list[tuple[str, Any]], rel: str, is_dir: bool) -> bool:
    """Whether the `.gitignore` files on the way to `rel` (shallowest first) ignore it, as git decides: the deepest
    one with a pattern that matches decides, by its last matching pattern (a `!` one re-includes), and a shallower
    one only where no deeper one matches."""
    for base, spec in reversed(rules):
        sub = rel if base == "." else rel[len(base) + 1 :] if rel.startswith(base + "/") else None
        if sub is None:
            continue
        include = spec.check_file(sub + "/" if is_dir else sub).include  # True: ignored, False: a `!`, None: no match
        if include is not None:
            return bool(include)
    return False


def git_files(root: Path, limit: int) -> list[str] | None:
    """Tracked and untracked-but-not-ignored files by `git ls-files` (None when git cannot answer)."""
    try:
        out = subprocess.run(
            ["git", "-c", "core.quotepath=off", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=root, capture_output=True, timeout=120, env=git_env(root=root),
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    names = sorted({n for n in out.stdout.decode(errors="surrogateescape").split("\0") if n})
    return names[: limit + 1]


# Settings given to every git bkg runs (the environment's config outranks the repository's own, like `-c`): the
# keys through which a config names a program for git to run on a read-only command (status, diff, log)
GIT_SAFE = {
    "core.fsmonitor": "false",
    "core.hooksPath": os.devnull,
    "core.pager": "cat",
    "core.sshCommand": "false",
    "commit.gpgSign": "false",
    "tag.gpgSign": "false",
    # a folder a caller wrote HEAD, config and objects/ into is not a repository git may read (its config would
    # name programs), nor is a signature checked with a program a config names
    "safe.bareRepository": "explicit",
    "log.showSignature": "false",
    "gpg.program": "false",
    "gpg.ssh.program": "false",
    "gpg.x509.program": "false",
}


def git_safe_env(root: Path | None = None) -> dict[str, str]:
    """No user or system git config, and `GIT_SAFE` over the repository's own; with the repository's `root`,
    every filter driver its config defines pinned off as well (`filter_drivers`)."""
    pins = dict(GIT_SAFE)
    for driver in filter_drivers(root) if root is not None else ():
        for key in ("clean", "smudge", "process"):  # an empty command runs nothing
            pins[f"filter.{driver}.{key}"] = ""
        pins[f"filter.{driver}.required"] = "false"
    env = {"GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_COUNT": str(len(pins))}
    for i, (key, value) in enumerate(pins.items()):
        env[f"GIT_CONFIG_KEY_{i}"], env[f"GIT_CONFIG_VALUE_{i}"] = key, value
    return env


_DRIVERS: dict[str, tuple[tuple[int, int], list[str]]] = {}  # git dir -> (its config's mtime and size, drivers)


def filter_drivers(root: Path) -> list[str]:
    """The filter drivers the repository at `root` defines (`filter.<driver>.clean|smudge|process` in its config,
    included files too): a `.gitattributes` a caller writes (`* filter=x`) would have git run each one's program
    on every status, diff and commit. Read by `git config` itself, once per change of the config."""
    config = root / ".git" / "config"
    try:
        st = config.stat()
        stamp = (st.st_mtime_ns, st.st_size)
    except OSError:
        stamp = (0, 0)
    found = _DRIVERS.get(str(root))
    if found is not None and found[0] == stamp and stamp != (0, 0):
        return found[1]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/nonexistent", "LANG": "C.UTF-8",
           "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull}  # fmt: skip
    try:
        out = subprocess.run(["git", "config", "--null", "--name-only", "--get-regexp", r"^filter\."],
                             cwd=root, capture_output=True, timeout=30, env=env).stdout  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        out = b""
    names = {n.decode(errors="surrogateescape") for n in out.split(b"\0") if n}
    drivers = sorted({n[len("filter.") : n.rindex(".")] for n in names if n.count(".") >= 2})
    _DRIVERS[str(root)] = (stamp, drivers)
    return drivers


def git_env(extra: dict[str, str] | None = None, root: Path | None = None) -> dict[str, str]:
    """A scrubbed environment for git: no user config, no pager, no prompts, `GIT_SAFE` (and, given the
    repository's `root`, its filter drivers off)."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": "/nonexistent",
        "LANG": "C.UTF-8",
        "GIT_TERMINAL_PROMPT": "0",
        "GIT_PAGER": "cat",
        **git_safe_env(root),
    }
    return {**env, **(extra or {})}


def is_git_dir(folder: Path) -> bool:
    """Whether `folder` is, or lies inside, a git directory (`.git`, or a bare repository): its `config` names
    programs git runs, so it is never a workspace."""
    if ".git" in folder.parts:
        return True
    return (folder / "HEAD").is_file() and (folder / "objects").is_dir() and (folder / "config").is_file()


def inside(ws_path: Path, rel: str, folders: dict[str, bool] | None = None) -> bool:
    """Whether the file `rel` is really in the workspace: a symlink, the file's own or any folder's on its way,
    counts only when it leads inside it (and not into `.git`); a link to /etc/passwd or the data dir, or a folder
    replaced by a link to one, is never read, searched or indexed. `folders` keeps each folder's answer across
    the files of one listing (each folder resolved once)."""
    parent, _, _ = rel.rpartition("/")
    ok = folders.get(parent) if folders is not None else None
    if ok is None:
        ok = _leads_inside(ws_path, parent, folder=True)
        if folders is not None:
            folders[parent] = ok
    if not ok:
        return False
    p = ws_path / rel
    return _leads_inside(ws_path, rel) if p.is_symlink() else p.exists()


def _leads_inside(ws_path: Path, rel: str, folder: bool = False) -> bool:
    try:
        real = (ws_path / rel).resolve(strict=True)
    except (OSError, RuntimeError):
        return False
    if real == ws_path:
        return folder
    return ws_path in real.parents and ".git" not in real.relative_to(ws_path).parts


def list_files(ws: Workspace, ignore: Ignore, limit: int, unnamed: list[str] | None = None) -> list[str]:
    """Every file of the workspace, relative, sorted, ignore rules honoured; 422 past `limit` files.

    A file whose name is not UTF-8 is left out (and its name, bytes escaped as `\\xff`, added to `unnamed`): it
    could not be named in a request, stored or answered, so one such file would fail every index run and search."""
    names = git_files(ws.path, limit) if ws.git else None
    folders: dict[str, bool] = {}
    if names is None:
        names = sorted(ignore.walk(ws.path, limit))
    else:
        names = [
            n
            for n in names
            if not ignore.skip(n) and not any(ignore.skip(d, True) for d in _parents(n)) and inside(ws.path, n, folders)
        ]  # a tracked file deleted from the working tree is listed by git but gone
    if len(names) > limit:  # counted before any is left out: a listing cut at the limit is never taken for whole
        raise InvalidInput(
            f"workspace {ws.name!r} has more than {limit} files (max_files): add ignore patterns or raise the limit",
            field="workspace",
        )
    bad = [n for n in names if not is_utf8(n)]
    if bad:
        names = [n for n in names if is_utf8(n)]
        if unnamed is not None:
            unnamed.extend(escaped(n) for n in bad)
    return names


def _parents(rel: str) -> Iterator[str]:
    parts = rel.split("/")[:-1]
    for i in range(1, len(parts) + 1):
        yield "/".join(parts[:i])


def is_binary(head: bytes) -> bool:
    """Say whether content looks binary: a NUL byte, or not UTF-8, in its first bytes."""
    if b"\0" in head[:BINARY_SNIFF]:
        return True
    try:
        head[:BINARY_SNIFF].decode("utf-8")
    except UnicodeDecodeError as exc:
        return exc.start < len(head[:BINARY_SNIFF]) - 4  # a multi-byte character cut at the sniff boundary is fine
    return False


def read_text(path: Path, max_bytes: int, field_name: str = "path") -> str:
    """Read a text file of at most `max_bytes`; 404 when missing, 422 for folders, binaries and big files."""
    if not path.exists():
        raise NotFound(f"{path.name!r} does not exist", field=field_name)
    if path.is_dir():
        raise InvalidInput(f"{path.name!r} is a folder (use repo.tree)", field=field_name)
    st = path.stat()
    if not stat.S_ISREG(st.st_mode):  # a FIFO's read would never end, a device's might never either
        raise InvalidInput(f"{path.name!r} is not a regular file", field=field_name)
    size = st.st_size
    if size > max_bytes:
        raise InvalidInput(f"{path.name!r} has {size} bytes, over max_file_bytes {max_bytes}", field=field_name)
    data = path.read_bytes()
    if is_binary(data):
        raise InvalidInput(f"{path.name!r} is a binary file: it is not returned as text", field=field_name)
    return data.decode("utf-8", errors="replace")


def text_lines(text: str) -> list[str]:
    """Split text into lines as git, `grep -n`, editors and tree-sitter count them: every line ends at a newline.

    A CR right before a newline is part of the line end (CRLF); a lone CR, a form feed, U+2028 and the other breaks
    `str.splitlines()` also knows stay inside their line. Every line number repoagent gives (symbols, chunks,
    citations, repo.file.read, repo.search, repo.refs) counts these lines (`parsing` maps Python's own, which also
    ends a line at a lone CR, onto them).
    """
    lines = text.split("\n")
    last = lines.pop()  # what follows the last newline: a last line without one, or nothing
    lines = [ln[:-1] if ln.endswith("\r") else ln for ln in lines]
    if last:
        lines.append(last)
    return lines


def file_lines(path: Path) -> list[str]:
    """The `text_lines` of a file read as UTF-8 (undecodable bytes replaced; an OSError when it cannot be read,
    or is not a regular file: a FIFO's read would never end)."""
    if not stat.S_ISREG(path.stat().st_mode):
        raise IsADirectoryError(f"{path.name} is not a regular file")
    return text_lines(path.read_bytes().decode("utf-8", errors="replace"))
