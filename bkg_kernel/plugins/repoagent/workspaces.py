"""repoagent's workspaces: the saved list of them, add and remove, each one's folder of state, cached index,
collection and locks.

A workspace is added only under a repo root and clear of the data dir (`Bounds`), and is held to both again on
every call: one left outside when `repo_roots` narrows answers 403 to all but its removal.

`Workspaces` is a part of the `RepoAgent` plugin class (which declares the capabilities): it holds what the
file, git and code-intelligence calls reach a workspace through.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from bkg_kernel import statefiles
from bkg_kernel.errors import AlreadyExists, Conflict, CorruptData, Forbidden, NotFound, expand_home
from bkg_kernel.models.registry import ModelRegistry
from bkg_kernel.namedlocks import NamedLocks
from bkg_kernel.plugins.repoagent.codeindex import CodeIndex
from bkg_kernel.plugins.repoagent.schemas import RepoSettings, Result
from bkg_kernel.plugins.repoagent.workspace import LIVE, Bounds, Ignore, Workspace, is_git_dir, list_files

if TYPE_CHECKING:
    from bkg_kernel.runtime.contract import PluginContext
    from bkg_kernel.runtime.storehandle import StoreHandle

REMOVED = ".removed-"  # a removed workspace's folder of state, renamed to be deleted (no workspace name starts with .)


class Workspaces:
    """The workspaces of a `RepoAgent`: loaded at its start, added and removed by `repo.workspace`."""

    # set by `Plugin.__init__` and `RepoAgent.start`
    settings: RepoSettings
    context: PluginContext | None
    log: logging.Logger
    roots: list[Path]
    ignore: Ignore

    def _load_workspaces(self) -> None:
        """Read the saved workspaces (a damaged file stops the start) and sweep what killed runs left."""
        assert self.context is not None
        self.home = self.context.work_dir
        self.registry_path = self.home / "workspaces.json"
        self.lock = threading.RLock()
        self.index_locks = NamedLocks()  # a workspace's index and commit runs, and its docs runs (`docs:<name>`)
        self.indexes: dict[str, CodeIndex] = {}
        self.workspaces: dict[str, Workspace] = {}
        self.bounds = Bounds(self.context.data_dir, lambda: self.roots)
        statefiles.sweep(self.registry_path)
        if self.registry_path.exists():
            try:
                saved = statefiles.load(self.registry_path, list)
            except CorruptData as exc:  # what repositories were added (and who may reach them): never guessed
                raise CorruptData(f"{exc.message}: repoagent will not start without knowing its workspaces; repair "
                                  "the file, or move it aside to start with none (the repositories stay where they "
                                  "are)") from None  # fmt: skip
            for i, d in enumerate(saved):
                if not (isinstance(d, dict) and isinstance(d.get("name"), str) and isinstance(d.get("path"), str)):
                    raise CorruptData(f"{self.registry_path}: entry {i} is not a workspace (a name and a path); "
                                      "repair the file, or move it aside to start with none")  # fmt: skip
                ws = Workspace(d["name"], Path(d["path"]), d.get("added_by", ""), d.get("added_at", 0.0),
                               bounds=self.bounds)  # fmt: skip
                skip = ("name", "path", "git", "added_by", "added_at", *LIVE)
                ws.info = {k: v for k, v in d.items() if k not in skip}
                self.workspaces[ws.name] = ws
                statefiles.sweep(self._dir(ws) / "index.json")  # left by a run that was killed (none runs yet)
                for old in self._dir(ws).glob("index.*.tmp"):  # the same, named the way older versions named them
                    old.unlink(missing_ok=True)
        for left in (self.home / "workspaces").glob(f"{REMOVED}*"):  # set aside by a remove that was cut short
            shutil.rmtree(left, ignore_errors=True)

    @property
    def store(self) -> StoreHandle:
        """The store, as the caller of the running call."""
        assert self.context is not None
        return self.context.store

    def _caller(self) -> str:
        assert self.context is not None
        who = self.context.caller
        return who.username if who is not None else "bkg"

    def _save(self) -> None:
        saved = [{k: v for k, v in w.to_dict().items() if k not in LIVE} for w in self.workspaces.values()]
        statefiles.write_json(self.registry_path, saved)

    def _ws(self, name: str) -> Workspace:
        ws = self.workspaces.get(name)
        if ws is None:
            raise NotFound(f"workspace {name!r} does not exist (add it with repo.workspace)", field="workspace")
        why = ws.off_limits()  # asked on every call: the roots narrow with a config change, the saved list stays
        if why is not None:
            raise Forbidden(why, field="workspace")
        if not ws.path.is_dir():
            raise NotFound(f"workspace {name!r}: its folder {ws.path} is gone", field="workspace")
        return ws

    def _dir(self, ws: Workspace) -> Path:
        return self.home / "workspaces" / ws.name

    def _index(self, ws: Workspace, need: bool = True) -> CodeIndex:
        """The workspace's published index: never changed once published (`index` builds the next one on a copy),
        so calls read it without a lock."""
        with self.lock:
            idx = self.indexes.get(ws.name)
            if idx is None:
                idx = CodeIndex.load(self._dir(ws) / "index.json")
                if self.workspaces.get(ws.name) is ws:  # one removed meanwhile leaves no index to its name's next owner
                    self.indexes[ws.name] = idx
        if need and not idx.files:
            raise NotFound(f"workspace {ws.name!r} is not indexed yet (run repo.index)", field="workspace")
        return idx

    def _files(self, ws: Workspace, unnamed: list[str] | None = None) -> list[str]:
        return list_files(ws, self.ignore, self.settings.max_files, unnamed)

    def _collection(self, ws: Workspace) -> str:
        return f"repo-{ws.name}"

    def _set_aside(self, ws: Workspace) -> Path | None:
        """Rename the workspace's folder of state out of its name (under `self.lock`), for the caller to delete once
        it has let go of the lock: deleted in place, it could take the index of a workspace added under that name
        meanwhile. None when there is no folder."""
        aside = self._dir(ws).with_name(f"{REMOVED}{uuid.uuid4().hex}")
        try:
            self._dir(ws).rename(aside)
        except FileNotFoundError:
            return None
        except OSError as exc:  # left in place: the next add of the name tries again
            self.log.warning("cannot set aside %s: %s", self._dir(ws), exc)
            return None
        return aside

    def _remove(self, ws: Workspace) -> Result:
        """Drop the workspace's collection and state; its files stay. 409 while a repo.index or repo.commit holds
        it: an index run would make the collection again after the drop and save its index for a name now free."""
        if not self.index_locks.acquire(ws.name, blocking=False):
            raise Conflict(f"workspace {ws.name!r} is being indexed (or committed): remove it when that ends (a "
                           "repo.index job can be cancelled)", field="name")  # fmt: skip
        try:
            if self.workspaces.get(ws.name) is not ws:  # removed by a call that held the lock before this one
                raise NotFound(f"workspace {ws.name!r} does not exist", field="name")
            if self._owns_collection(ws):
                with contextlib.suppress(NotFound):
                    self.store.drop_collection(self._collection(ws))
            with self.lock:
                self.workspaces.pop(ws.name, None)
                self.indexes.pop(ws.name, None)
                self._save()
                aside = self._set_aside(ws)
        finally:
            self.index_locks.release(ws.name)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
        return Result(removed=ws.name, path=str(ws.path), files_kept=True)

    def _add(self, name: str, path: str) -> Result:
        raw = expand_home(path, "path")  # NUL, over-long names: the caller's 422
        folder = (raw if raw.is_absolute() else self.roots[0] / raw).resolve()
        if not self.bounds.under_roots(folder):
            roots = ", ".join(map(str, self.roots))
            raise Forbidden(f"{folder} is outside the repo roots ({roots}): set repo_roots to allow it", field="path")
        near = self.bounds.near_data(folder)  # a root that holds the data dir would open its keys to repo:use
        if near is not None:
            raise Forbidden(near, field="path")
        if not folder.is_dir():
            raise NotFound(f"{folder} is not a folder", field="path")
        if is_git_dir(folder):  # its config names programs git runs: writing it would be running them
            raise Forbidden(f"{folder} is a git directory, not a working tree: add the folder that holds it",
                            field="path")  # fmt: skip
        with self.lock:
            if name in self.workspaces:
                raise AlreadyExists(f"workspace {name!r} already exists", field="name")
            ws = Workspace(name, folder, self._caller(), time.time(), bounds=self.bounds)
            files = self._files(ws)  # 422 past max_files: before anything is written
        with contextlib.suppress(NotFound):  # its index goes to repo-<name>: one made by someone else is theirs
            self.store.describe(self._collection(ws))
            raise AlreadyExists(f"a collection named {self._collection(ws)!r} exists: repoagent keeps workspace "
                                f"{name!r}'s index there, so name the workspace differently", field="name")  # fmt: skip
        with self.lock:
            if name in self.workspaces:
                raise AlreadyExists(f"workspace {name!r} already exists", field="name")
            ws.info = {"file_count": len(files)}
            # an index that a removed workspace of this name left behind would claim repo-<name> for this one
            aside = self._set_aside(ws)
            self.indexes.pop(name, None)
            self.workspaces[name] = ws
            self._save()
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
        return Result(**ws.to_dict())

    def _index_lock(self, ws: Workspace) -> contextlib.AbstractContextManager[None]:
        """Hold the workspace's index lock for a `with` block (a repo.index or a repo.commit)."""
        return self.index_locks.hold(ws.name)

    def _owns_collection(self, ws: Workspace) -> bool:
        """Whether `repo-<name>` is the one repoagent made for this workspace, or indexed into before it noted so (an
        index saved in the workspace's own folder, even one an older bkg wrote or a crash cut short: bkg before
        0f18f1e noted no collection): a collection of that name that someone else made is never dropped or filled."""
        return ws.info.get("collection") == self._collection(ws) or (self._dir(ws) / "index.json").exists()

    def _ensure_collection(self, ws: Workspace) -> tuple[str, bool]:
        """Create `repo-<name>` when missing; return its embed model and whether it was made now (409 when a
        collection of that name that repoagent did not make is in the way)."""
        name = self._collection(ws)
        try:
            described = self.store.describe(name)
        except NotFound:
            described = None
        if described is not None:
            if not self._owns_collection(ws):
                raise AlreadyExists(f"collection {name!r} exists and repoagent did not make it: remove the workspace "
                                    "and add it under another name", field="workspace")  # fmt: skip
            return str(described["embed_model"]), False
        assert self.context is not None and self.context.model_dir is not None
        spec = self.settings.embed_model
        self.store.create_collection(name, ModelRegistry(self.context.model_dir).embedding_dim(spec), embed_model=spec)
        with self.lock:
            ws.info["collection"] = name
            self._save()
        return spec, True
