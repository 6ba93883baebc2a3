"""The model registry: `<model_dir>/manifest.json`, one entry per model (id, kind, file, sha256, size, license,
source, added), written atomically under a file lock.

A file next to the weights, not a table in the store: worker processes (llmserver, candle) resolve model ids
without asking the gateway, and `bkg models list` works with no gateway running. Paths inside the model dir
are stored relative to it; files that come from a Python package are found again through the package. The
manifest also lists the packaged defaults it ever held (`defaults`): each is put in once, and one removed stays
removed.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, PrivateAttr, ValidationError

from bkg_kernel import statefiles
from bkg_kernel.errors import (
    AlreadyExists,
    BkgError,
    Conflict,
    CorruptData,
    InvalidFile,
    InvalidInput,
    NotFound,
    SchemaTooNew,
    expand_home,
)
from bkg_kernel.models import kinds
from bkg_kernel.models.defaults import DEFAULTS, package_path

Kind = Literal["gguf-llm", "gguf-embedding", "hf-transformers", "onnx", "face-pack", "torch-program", "classifier"]
KINDS: tuple[str, ...] = (
    "gguf-llm",
    "gguf-embedding",
    "hf-transformers",
    "onnx",
    "face-pack",
    "torch-program",
    "classifier",
)
MANIFEST = "manifest.json"
MANIFEST_VERSION = 1  # the newest manifest this bkg writes; a newer one is read, never rewritten
log = logging.getLogger("bkg.models")
# a file system without hard links (exFAT, FAT, some network mounts), or a model dir on another mount than .partial/
_NO_LINKS = {errno.EPERM, errno.EXDEV, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK}
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"  # a model id is a folder name in the model dir: no path parts
_ID = re.compile(ID_PATTERN)


def check_id(model_id: Any, field: str = "id") -> str:
    """Return `model_id` if it is a safe model id (1-128 letters, digits, '.', '_', '-'; not starting with a dot),
    else raise 422 naming `field`: checked before anything is written under it."""
    if not isinstance(model_id, str) or not _ID.fullmatch(model_id):
        shown = repr(model_id)[:80]
        raise InvalidInput(
            f"model id {shown} must be 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit",
            field=field,
        )
    return model_id


class ModelEntry(BaseModel):
    """One registered model."""

    id: str
    kind: Kind
    path: str = Field(description="Relative to the model dir, absolute, or relative to a package (source).")
    sha256: str
    size: int
    license: str | None = None
    source: str = Field(description="`package:<dist>`, `path`, `import:copy`, `import:link` or a URL.")
    added: str
    meta: dict[str, Any] = Field(default_factory=dict)
    # fields a newer bkg wrote: written back as they were, shown nowhere (not in the API, not in the JSON Schema)
    _unknown: dict[str, Any] = PrivateAttr(default_factory=dict)

    @classmethod
    def from_manifest(cls, data: Any) -> ModelEntry:
        """Read one manifest entry, keeping the fields this bkg does not know so that a write does not drop them."""
        entry = cls.model_validate(data)
        entry._unknown = {k: v for k, v in data.items() if k not in cls.model_fields}
        return entry

    def to_manifest(self) -> dict[str, Any]:
        """The entry as the manifest holds it: its own fields, then those a newer bkg wrote."""
        return {**self.model_dump(), **self._unknown}


@dataclass
class _Held:
    """The manifest as read under its lock: the entries, and the packaged defaults it ever held (a removed one is
    not put in again)."""

    models: dict[str, ModelEntry]
    defaults: set[str]


class ModelRegistry:
    """Add, list, verify and remove models; register the packaged defaults once (`register_defaults`: now)."""

    def __init__(self, model_dir: Path | str, *, register_defaults: bool = True) -> None:
        self.dir = Path(model_dir).resolve()
        self.manifest = self.dir / MANIFEST
        self._cache: tuple[tuple[int, int, int], dict[str, ModelEntry]] | None = None
        if register_defaults:
            self.ensure_defaults()

    # -- reading ----------------------------------------------------------------------------------
    def _read(self) -> dict[str, ModelEntry]:
        """The entries, parsed again only when the manifest changed (a write replaces the file: a new inode): candle
        and llmserver ask on every call which weights an id names now, holding their lock."""
        try:
            st = self.manifest.stat()
            key = (st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            return {}
        cached = self._cache
        if cached is not None and cached[0] == key:
            return dict(cached[1])
        models = self._entries()[0]
        self._cache = (key, models)
        return dict(models)

    def _entries(self) -> tuple[dict[str, ModelEntry], builtins.list[Any], Any]:
        """The entries, what the manifest lists that is not an entry (left out with a warning, and written back as
        it was: a write never drops it), and the manifest's version. A manifest that is not JSON is a `CorruptData`."""
        models, unread, version, _ = self._manifest()
        return models, unread, version

    def _manifest(self) -> tuple[dict[str, ModelEntry], builtins.list[Any], Any, set[str]]:
        """`_entries`, and the packaged defaults the manifest ever held: those it lists as such (a manifest an older
        bkg wrote lists none) and those it holds now."""
        try:
            raw = json.loads(self.manifest.read_text())
        except FileNotFoundError:
            return {}, [], MANIFEST_VERSION, set()
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CorruptData(f"{self.manifest} cannot be read: {exc}", field="manifest") from None
        listed = raw.get("models") if isinstance(raw, dict) else None
        if not isinstance(listed, builtins.list):
            raise CorruptData(f"{self.manifest} holds no list of models", field="manifest")
        models: dict[str, ModelEntry] = {}
        unread: builtins.list[Any] = []
        for i, m in enumerate(listed):
            try:
                entry = ModelEntry.from_manifest(m)
            except ValidationError as exc:
                label = str(m.get("id"))[:80] if isinstance(m, dict) else type(m).__name__
                log.warning("%s: entry %d (%s) is not a model (%s): left out", self.manifest, i, label,
                            exc.errors()[0]["msg"])  # fmt: skip
                unread.append(m)
                continue
            models[entry.id] = entry
        said = raw.get("defaults")
        held = {d for d in said if isinstance(d, str)} if isinstance(said, builtins.list) else set()
        return models, unread, raw.get("version", MANIFEST_VERSION), held | _defaults_in(models)

    def _refuse_newer(self, version: Any) -> None:
        """409 for a manifest a newer bkg wrote: rewriting it as this version's would lose what this bkg cannot read."""
        if _newer(version):
            raise SchemaTooNew(f"{self.manifest} is a manifest of version {version}, but this bkg writes version "
                               f"{MANIFEST_VERSION}: upgrade bkg-kernel to change it (it can still be read)",
                               field="manifest")  # fmt: skip

    def list(self, kind: str | None = None) -> list[ModelEntry]:
        """Return every registered model (of one kind; an unknown kind is a 422 naming the kinds)."""
        if kind is not None and kind not in KINDS:
            raise InvalidInput(f"kind must be one of {', '.join(KINDS)}, not {kind!r}", field="kind")
        return [m for m in self._read().values() if kind is None or m.kind == kind]

    def get(self, model_id: str) -> ModelEntry:
        """Return one entry or raise NotFound naming the known ids."""
        models = self._read()
        if model_id not in models:
            known = ", ".join(sorted(models)) or "none"
            raise NotFound(f"model {model_id!r} is not registered (known: {known})", field="model")
        return models[model_id]

    def embedding_dim(self, spec: str) -> int:
        """Return the vector size of an embedding model spec (`candle:<id>` or `llmserver:<id>`)."""
        model = spec.partition(":")[2]
        meta = self.get(model).meta
        dim = meta.get("hidden_size") or meta.get("embedding_length")
        if not dim:
            raise InvalidInput(f"cannot tell the embedding size of {model!r}", field="embed_model")
        return int(dim)

    def resolve(self, entry: ModelEntry | str) -> Path:
        """Return the absolute path of a model's file or folder."""
        e = self.get(entry) if isinstance(entry, str) else entry
        if e.source.startswith("package:"):
            return package_path(e.source.split(":", 1)[1], e.path)
        p = Path(e.path)
        return p if p.is_absolute() else self.dir / p

    # -- writing ----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[_Held]:
        """Hold the manifest lock, yield the entries, write them back atomically."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / ".manifest.lock", "a") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            models, unread, version, defaults = self._manifest()
            self._refuse_newer(version)
            held = _Held(models, defaults)
            yield held
            listed = [m.to_manifest() for m in sorted(models.values(), key=lambda m: m.id)]
            done = sorted(held.defaults | _defaults_in(models))  # a default removed now stays in: not put in again
            data = {"version": MANIFEST_VERSION, "defaults": done, "models": listed + unread}
            statefiles.write(self.manifest, json.dumps(data, indent=2) + "\n")
            self._cache = None  # (a write within the file system's clock tick may keep size and time)

    @contextlib.contextmanager
    def staged(self, name: str) -> Iterator[Path]:
        """A path for `name` inside `.partial/` to write a model's file or folder to before `place` puts it in the
        model dir: a folder of its own (two writers never share one), gone afterwards unless placed; one a killed
        process left is swept at the next start (`download.sweep_partial`)."""
        root = self.dir / ".partial"
        root.mkdir(parents=True, exist_ok=True)
        holder = Path(tempfile.mkdtemp(dir=root, prefix=f"{name}."))
        try:
            yield holder / name
        finally:
            shutil.rmtree(holder, ignore_errors=True)

    @staticmethod
    def place(staged: Path, dest: Path, field: str = "id") -> None:
        """Move a `staged` file or folder to `dest`, never over what is there (of two writers, one wins)."""
        try:
            if staged.is_dir() and not staged.is_symlink():
                os.rename(staged, dest)  # refused when dest is a file or a folder with anything in it
            else:
                try:
                    os.link(staged, dest, follow_symlinks=False)  # refused when dest exists
                except OSError as exc:
                    if exc.errno not in _NO_LINKS:
                        raise
                    os.close(os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))  # taken here, or refused
                    os.replace(staged, dest)
                else:
                    staged.unlink()
        except OSError as exc:
            taken = isinstance(exc, (FileExistsError, IsADirectoryError, NotADirectoryError))
            if not (taken or exc.errno == errno.ENOTEMPTY):
                raise
            raise AlreadyExists(f"{dest} already exists in the model dir", field=field) from None

    def add(
        self,
        path: Path | str,
        *,
        id: str | None = None,
        kind: str | None = None,
        license: str | None = None,
        import_mode: Literal["copy", "link"] | None = None,
        source: str | None = None,
    ) -> ModelEntry:
        """Register a model file or folder; a path outside the model dir needs `import_mode` copy or link."""
        src = expand_home(str(path), "path")
        if not src.exists():
            raise NotFound(f"no file or folder at {src}", field="path")
        src = src.resolve()
        if src == self.dir or src in self.dir.parents:
            raise InvalidInput(f"{src} holds the whole model dir: name a model's own file or folder", field="path")
        if kind is not None and kind not in KINDS:
            raise InvalidInput(f"kind must be one of {', '.join(KINDS)}, not {kind!r}", field="kind")
        try:  # refuses files that are not what their kind says: the caller's file, the caller's 422
            detected = kinds.inspect(src, kind)
        except CorruptData as exc:
            raise InvalidFile(exc.message, field="path") from None
        model_id = self.check_new(slug(src.name) if id is None else id)
        inside = src.is_relative_to(self.dir)
        if inside or source is not None:  # registered where it is: never in (or over) another model's files
            self._refuse_shared(src, self._entries()[0])
        if not inside and source is None:
            if import_mode is None:
                raise InvalidInput(
                    f"{src} is outside the model dir {self.dir}: import it with import_mode 'copy' or 'link' "
                    "(CLI: --import copy|link)",
                    field="path",
                )
            src = self._import(src, model_id, import_mode)
        digest, size = sha256_of(src)
        stored = str(src.relative_to(self.dir)) if src.is_relative_to(self.dir) else str(src)
        entry = ModelEntry(
            id=model_id,
            kind=detected.kind,
            path=stored,
            sha256=digest,
            size=size,
            license=license or detected.license,
            source=source or (f"import:{import_mode}" if not inside else "path"),
            added=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            meta=detected.meta,
        )
        with self._locked() as held:
            if model_id in held.models:
                raise AlreadyExists(f"model {model_id!r} is already registered", field="id")
            self._refuse_shared(src, held.models)  # again under the lock: another add may have taken it meanwhile
            held.models[model_id] = entry
        return entry

    def _places(self, entry: ModelEntry) -> set[Path]:
        """Where an entry's files are: its path as registered and, through a link, where they really are."""
        try:
            path = Path(os.path.abspath(self.resolve(entry)))
        except BkgError:  # its package is no longer installed: it holds no file here
            return set()
        return {path, path.resolve()}

    def _user_of(self, paths: set[Path], models: dict[str, ModelEntry]) -> tuple[ModelEntry, Path] | None:
        """An entry whose files are one of `paths`, inside one or hold one (and which of its places), if any."""
        for other in sorted(models.values(), key=lambda m: m.id):
            for place in self._places(other):
                if any(p == place or place in p.parents or p in place.parents for p in paths):
                    return other, place
        return None

    def _refuse_shared(self, src: Path, models: dict[str, ModelEntry]) -> None:
        """409 naming the entry whose files `src` is, is inside or holds: two entries on one file, and removing one
        with its files deleted the other's."""
        found = self._user_of({src}, models)
        if found is None:
            return
        other, place = found
        if src == place:
            how = f"is already model {other.id!r}"
        elif place in src.parents:
            how = f"is inside model {other.id!r} ({place})"
        else:
            how = f"holds model {other.id!r} ({place})"
        raise AlreadyExists(
            f"{src} {how}: a model's files are registered once (removing one of two entries with its files would "
            "delete the other's); for another id of the same files, import a copy (import_mode 'copy')",
            field="path",
        )

    def _import(self, src: Path, model_id: str, mode: str) -> Path:
        dest = self.dir / (model_id + src.suffix if src.is_file() and not model_id.endswith(src.suffix) else model_id)
        if dest.exists() or dest.is_symlink():
            raise AlreadyExists(f"{dest} already exists in the model dir", field="id")
        self.dir.mkdir(parents=True, exist_ok=True)
        if mode == "link":
            dest.symlink_to(src, target_is_directory=src.is_dir())
        elif mode == "copy":
            with self.staged(dest.name) as partial:
                (shutil.copytree if src.is_dir() else shutil.copyfile)(src, partial)
                self.place(partial, dest)
        else:
            raise InvalidInput(f"import_mode must be 'copy' or 'link', not {mode!r}", field="import_mode")
        return dest

    def verify(self, model_id: str) -> dict[str, Any]:
        """Recompute the sha256 and report drift (or a missing file)."""
        e = self.get(model_id)
        path = self.resolve(e)
        if not path.exists():
            return {"id": e.id, "ok": False, "missing": True, "drift": False, "path": str(path), "expected": e.sha256}
        digest, size = sha256_of(path)
        ok = digest == e.sha256 and size == e.size
        return {
            "id": e.id, "ok": ok, "missing": False, "drift": not ok, "path": str(path),
            "expected": e.sha256, "actual": digest, "size": size, "expected_size": e.size,
        }  # fmt: skip

    def check_new(self, model_id: str, file_name: str | None = None) -> str:
        """Return `model_id` if a new model may take it (and its file `file_name` may land in the model dir), else
        raise the caller's 422 / 409: asked before a download starts, not after it ends."""
        check_id(model_id, "id")
        models, _, version = self._entries()
        self._refuse_newer(version)  # before a download or a copy: it could not be registered
        if model_id in models:
            raise AlreadyExists(f"model {model_id!r} is already registered", field="id")
        if file_name is not None and (self.dir / file_name).exists():
            raise AlreadyExists(f"{self.dir / file_name} already exists in the model dir", field="url")
        return model_id

    def remove(self, model_id: str, *, delete_files: bool = False) -> ModelEntry:
        """Unregister a model; with `delete_files`, also delete its file if it lives in the model dir (refused, 409,
        while another entry's files are in it or hold it)."""
        if model_id not in self._entries()[0]:  # before the lock: a model dir that is not there is not made
            raise NotFound(f"model {model_id!r} is not registered", field="model")
        with self._locked() as held:
            models = held.models
            if model_id not in models:
                raise NotFound(f"model {model_id!r} is not registered", field="model")
            e = models[model_id]
            path = None if e.source.startswith("package:") else self.resolve(e)
            doomed = path if delete_files and path is not None and self.dir in path.parents else None  # not the dir
            if doomed is not None:
                lexical = Path(os.path.abspath(doomed))
                gone = {lexical} if doomed.is_symlink() else {lexical, lexical.resolve()}  # a link: only the link
                found = self._user_of(gone, {k: v for k, v in models.items() if k != model_id})
                if found is not None:
                    other, place = found
                    raise Conflict(
                        f"the files of {model_id!r} ({doomed}) are also model {other.id!r}'s ({place}): nothing "
                        f"removed; remove {model_id!r} without deleting its files",
                        field="delete_files",
                    )
            models.pop(model_id)
        if doomed is not None:
            if doomed.is_symlink() or doomed.is_file():
                doomed.unlink(missing_ok=True)
            elif doomed.is_dir():
                shutil.rmtree(doomed)
        return e

    def register_entry(self, entry: ModelEntry) -> ModelEntry:
        """Record an entry built elsewhere (a quantized model, a download); refuses a taken id."""
        check_id(entry.id, "id")
        with self._locked() as held:
            if entry.id in held.models:
                raise AlreadyExists(f"model {entry.id!r} is already registered", field="id")
            held.models[entry.id] = entry
        return entry

    def ensure_defaults(self) -> builtins.list[str]:
        """Register each default model whose package is installed and that this manifest never held (one removed
        stays removed; a package installed later is registered then); return the new ids."""
        _, _, version, done = self._manifest()
        if _newer(version):  # a newer bkg's manifest: read, never added to
            return []
        new: builtins.list[ModelEntry] = []
        for d in DEFAULTS:
            if d.id in done:
                continue
            try:
                path = package_path(d.package, d.relpath)
            except NotFound:
                continue  # that package is not installed: nothing to register
            found = kinds.inspect(path, d.kind)
            digest, size = sha256_of(path)
            entry = ModelEntry(
                id=d.id, kind=d.kind, path=d.relpath, sha256=digest, size=size,
                license=d.license, source=f"package:{d.package}",
                added=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), meta=found.meta,
            )  # fmt: skip
            new.append(entry)
        if not new:
            return []  # nothing to write: a manifest that holds them all is not touched
        added = []
        with self._locked() as held:
            for entry in new:
                if entry.id not in held.defaults and entry.id not in held.models:  # another process's meanwhile
                    held.models[entry.id] = entry
                    added.append(entry.id)
        return added

    def _repr_html_(self) -> str:
        from bkg_kernel.display import fmt_bytes, html_table

        rows = [[m.id, m.kind, fmt_bytes(m.size), m.license or "", m.source, m.sha256[:12]] for m in self.list()]
        return html_table(["id", "kind", "size", "license", "source", "sha256"], rows)


def _newer(version: Any) -> bool:
    return isinstance(version, int) and version > MANIFEST_VERSION


def _defaults_in(models: dict[str, ModelEntry]) -> set[str]:
    return {d.id for d in DEFAULTS if d.id in models}


def slug(name: str) -> str:
    """Turn a file name into a model id: lower case, no extension, safe characters."""
    stem = name
    for ext in (".gguf", ".onnx", ".pt2", ".pt"):
        if stem.lower().endswith(ext):
            stem = stem[: -len(ext)]
    s = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-.").lower()
    return s[:128] or "model"


def sha256_of(path: Path) -> tuple[str, int]:
    """Return the sha256 and total size of a file, or of a folder (its files' relative paths and contents)."""
    h = hashlib.sha256()
    if path.is_file():
        with path.open("rb") as f:
            size = _feed(h, f)
        return h.hexdigest(), size
    size = 0
    for p in sorted(q for q in path.rglob("*") if q.is_file() and not q.name.startswith(".")):
        h.update(os.fsencode(p.relative_to(path)) + b"\0")  # a name's bytes: UTF-8 or not, it is hashed as it is
        with p.open("rb") as f:
            size += _feed(h, f)
    return h.hexdigest(), size


def _feed(h: Any, f: Any) -> int:
    n = 0
    while chunk := f.read(1 << 20):
        h.update(chunk)
        n += len(chunk)
    return n
