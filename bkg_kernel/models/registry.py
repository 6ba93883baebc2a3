"""The model registry: `<model_dir>/manifest.json`, one entry per model (id, kind, file, sha256, size, license,
source, added), written atomically under a file lock.

A file next to the weights, not a table in the store: worker processes (llmserver, candle) resolve model ids
without asking the gateway, and `bkg models list` works with no gateway running. Paths inside the model dir
are stored relative to it; files that come from a Python package are found again through the package.
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
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, PrivateAttr, ValidationError

from bkg_kernel import statefiles
from bkg_kernel.errors import (
    AlreadyExists,
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


class ModelRegistry:
    """Add, list, verify and remove models; register the packaged defaults on first use."""

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
        try:
            raw = json.loads(self.manifest.read_text())
        except FileNotFoundError:
            return {}, [], MANIFEST_VERSION
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
        return models, unread, raw.get("version", MANIFEST_VERSION)

    def _refuse_newer(self, version: Any) -> None:
        """409 for a manifest a newer bkg wrote: rewriting it as this version's would lose what this bkg cannot read."""
        if _newer(version):
            raise SchemaTooNew(f"{self.manifest} is a manifest of version {version}, but this bkg writes version "
                               f"{MANIFEST_VERSION}: upgrade bkg-kernel to change it (it can still be read)",
                               field="manifest")  # fmt: skip

    def list(self, kind: str | None = None) -> list[ModelEntry]:
        """Return every registered model (of one kind)."""
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
    def _locked(self) -> Iterator[dict[str, ModelEntry]]:
        """Hold the manifest lock, yield the entries, write them back atomically."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / ".manifest.lock", "a") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            models, unread, version = self._entries()
            self._refuse_newer(version)
            yield models
            listed = [m.to_manifest() for m in sorted(models.values(), key=lambda m: m.id)]
            data = {"version": MANIFEST_VERSION, "models": listed + unread}
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
        model_id = self.check_new(id or slug(src.name))
        inside = src.is_relative_to(self.dir)
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
        with self._locked() as models:
            if model_id in models:
                raise AlreadyExists(f"model {model_id!r} is already registered", field="id")
            models[model_id] = entry
        return entry

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
        """Unregister a model; with `delete_files`, also delete its file if it lives in the model dir."""
        with self._locked() as models:
            if model_id not in models:
                raise NotFound(f"model {model_id!r} is not registered", field="model")
            e = models.pop(model_id)
        path = self.resolve(e)
        if delete_files and not e.source.startswith("package:") and self.dir in path.parents:  # never the dir itself
            if path.is_symlink() or path.is_file():
                path.unlink(missing_ok=True)
            elif path.is_dir():
                shutil.rmtree(path)
        return e

    def register_entry(self, entry: ModelEntry) -> ModelEntry:
        """Record an entry built elsewhere (a quantized model, a download); refuses a taken id."""
        check_id(entry.id, "id")
        with self._locked() as models:
            if entry.id in models:
                raise AlreadyExists(f"model {entry.id!r} is already registered", field="id")
            models[entry.id] = entry
        return entry

    def ensure_defaults(self) -> builtins.list[str]:
        """Register each default model whose package is installed and whose id is free; return the new ids."""
        have, _, version = self._entries()
        if _newer(version):  # a newer bkg's manifest: read, never added to
            return []
        added = []
        for d in DEFAULTS:
            if d.id in have:
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
            with contextlib.suppress(AlreadyExists):  # another process registered it meanwhile
                self.register_entry(entry)
                added.append(d.id)
        return added

    def _repr_html_(self) -> str:
        from bkg_kernel.display import fmt_bytes, html_table

        rows = [[m.id, m.kind, fmt_bytes(m.size), m.license or "", m.source, m.sha256[:12]] for m in self.list()]
        return html_table(["id", "kind", "size", "license", "source", "sha256"], rows)


def _newer(version: Any) -> bool:
    return isinstance(version, int) and version > MANIFEST_VERSION


def slug(name: str) -> str:
    """Turn a file name into a model id: lower case, no extension, safe characters."""
    stem = name
    for ext in (".gguf", ".onnx"):
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
