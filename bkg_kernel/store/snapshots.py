"""Snapshot archives: one tar per snapshot with the collection's rows (Parquet), its FAISS and full-text
indexes and a manifest holding the sha256 of every part. Archives live under `<data_dir>/snapshots/<collection>/`
and outlive the collection. A restore verifies everything before it touches the live collection."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import secrets
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb

from bkg_kernel.errors import (
    AlreadyExists,
    BkgError,
    Cancelled,
    Conflict,
    CorruptData,
    InvalidInput,
    NotFound,
    SchemaTooNew,
    escaped,
    is_utf8,
)
from bkg_kernel.store import validate
from bkg_kernel.store.fulltext import TextIndex
from bkg_kernel.store.index import KINDS, VectorIndex, _faiss, meta_path
from bkg_kernel.store.results import SnapshotInfo, SnapshotList
from bkg_kernel.store.sql import scalar, transaction

if TYPE_CHECKING:
    from bkg_kernel.store.collection import Collection
    from bkg_kernel.store.store import Store

log = logging.getLogger("bkg.store")
FORMAT = "bkg-snapshot/1"
SUFFIX = ".bkgsnap"
_ID = re.compile(r"^[0-9A-Za-z][0-9A-Za-z_-]{0,63}$")
PARTS = ("points.parquet", "index.faiss")
TEXT_PART = "fulltext.fts"  # in archives from this version on; an archive without it rebuilds it from the rows
SHOW_FROM = 50_000  # points from which a snapshot or a restore shows a progress bar unless told (as an upsert)
Progress = Callable[[float, str], None]  # (fraction done 0..1, what it is doing), as a gateway job's


def _sql_path(p: Path) -> str:
    return "'" + str(p).replace("'", "''") + "'"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _make_folder(dest: Path) -> None:
    """Make a collection's snapshot folder; a file where it or the snapshots folder must be is a 409 naming it
    (left as it is), not NotADirectoryError."""
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except (NotADirectoryError, FileExistsError):
        in_way = next((p for p in (dest.parent, dest) if p.exists() and not p.is_dir()), dest)
        raise Conflict(f"{in_way} is in the way: a file where a folder of snapshots must be; move it away and "
                       "take the snapshot again") from None  # fmt: skip


def create(store: Store, coll: Collection, progress: bool | Progress | None = None) -> SnapshotInfo:
    """Write `<snapshots>/<name>/<id>.bkgsnap` atomically (temp file, fsync, rename).

    The collection's own lock is held while its index files are saved and linked into the work folder and a read
    of the rows is opened on a connection of its own (`Collection._reading`), all at one moment: a write of this
    collection waits for it, other collections' writes do not (the store's lock is not taken: nothing here uses
    the store's connection). The rows are exported, hashed and archived after that, from that read's snapshot,
    while other calls go on (a collection of a million points takes seconds to export). `progress`: see
    `reporting`."""
    with reporting(progress, f"snapshot {coll.name}", coll._next_fid) as tell:  # noqa: SLF001
        return _create(store, coll, tell)


def _create(store: Store, coll: Collection, tell: Progress) -> SnapshotInfo:
    now = datetime.now(UTC)
    snap_id = now.strftime("%Y%m%dT%H%M%S%fZ") + "-" + secrets.token_hex(3)
    dest = store.snapshot_dir / coll.name
    with contextlib.ExitStack() as stack:
        tell(0.0, "saving the indexes")
        with coll._searching():  # noqa: SLF001 - the collection's lock alone: its writes wait, no one else's
            coll._ensure_index()  # noqa: SLF001 - the index files must be current before they are copied
            coll._ensure_text()  # noqa: SLF001
            _make_folder(dest)
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=dest, prefix=".tmp-")))
            _save_indexes(store, coll, work)
            con = stack.enter_context(coll._reading())  # noqa: SLF001
            con.begin()  # one snapshot of the rows for the count and the export: as they are with these indexes
            count = int(scalar(con, f"SELECT count(*) FROM {coll.table}"))
            next_fid, next_seq = coll._next_fid, coll._next_seq  # noqa: SLF001 - loaded: `_ensure_index` above
        tell(0.1, f"indexes saved; exporting {count:,} points")
        con.execute(
            "COPY (SELECT fid, pk, vec, CAST(payload AS VARCHAR) AS payload, text, seq "
            f"FROM {coll.table} ORDER BY fid) TO {_sql_path(work / 'points.parquet')} (FORMAT parquet)"
        )
        con.rollback()
        tell(0.55, "rows exported; hashing the parts")
        parts = (*PARTS, TEXT_PART)
        manifest = {
            "format": FORMAT,
            "id": snap_id,
            "collection": coll.name,
            "created_at": now.isoformat(),
            "dim": coll.dim,
            "metric": coll.metric,
            "index": coll.index_kind,
            "params": coll.params,
            "embed_model": coll.embed_model,
            "next_fid": next_fid,
            "next_seq": next_seq,
            "count": count,
            "parts": {p: {"sha256": _sha256(work / p), "bytes": (work / p).stat().st_size} for p in parts},
        }
        tell(0.7, "parts hashed; writing the archive")
        archive = work / "archive.tar"
        with tarfile.open(archive, "w") as tar:
            blob = json.dumps(manifest, indent=1).encode()
            info = tarfile.TarInfo("manifest.json")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
            for p in parts:
                tar.add(work / p, arcname=p)
        with open(archive, "rb+") as fh:
            os.fsync(fh.fileno())
        final = dest / f"{snap_id}{SUFFIX}"
        _keep(store, coll, work, final)
    _done(tell, f"snapshot {snap_id} written")
    return _info(final, manifest)


def _save_indexes(store: Store, coll: Collection, work: Path) -> None:
    """Save the collection's vector and full-text indexes as they are now and link them into `work`. Call holding
    the collection's lock: no write of it comes between this and the read of its rows that follows, so the files
    are those rows' indexes. The files are linked under `_saving`, the leaf lock under which a drop or a restore
    removes them (having marked the handle first): they are there, or the handle says why not (404, 409)."""
    coll._unsaved = coll._text_unsaved = True  # noqa: SLF001 - saved even if unchanged: the files must be there
    coll.flush()
    with coll._saving:  # noqa: SLF001
        coll._live()  # noqa: SLF001
        _link(store.index_path(coll.table), work / "index.faiss")
        _link(store.text_index_path(coll.table), work / TEXT_PART)


def _done(tell: Progress, message: str) -> None:
    """Report the work done: a cancel that comes now is too late (the archive is kept, the restore swapped in), so
    the call says what it did rather than that it was cancelled."""
    with contextlib.suppress(Cancelled):
        tell(1.0, message)


def _quiet(fraction: float, message: str) -> None:
    """Report nothing."""


def check_progress(progress: object) -> bool | Progress | None:
    """Return `progress` if it is one `reporting` takes, else a 422 naming the field."""
    if progress is None or isinstance(progress, bool) or callable(progress):
        return progress
    raise InvalidInput("progress must be true, false, null or a function of (fraction, message)", field="progress")


@contextlib.contextmanager
def reporting(progress: bool | Progress | None, desc: str, points: int) -> Iterator[Progress]:
    """The callback a snapshot or a restore reports its steps to, `(fraction 0..1, message)`: `progress` itself
    when it is a function (a job's progress, a widget), a tqdm bar in percent when true (None: when the collection
    has `SHOW_FROM` points or more, as an upsert's bar), else nothing; `progress` checked by the caller
    (`check_progress`, as `Store.snapshot` and `Store.restore_snapshot` do first)."""
    if callable(progress):
        yield progress
        return
    if not (points >= SHOW_FROM if progress is None else progress):
        yield _quiet
        return
    from tqdm.auto import tqdm

    with tqdm(total=100, desc=desc, unit="%", bar_format="{l_bar}{bar}| {n:.0f}% [{elapsed}]{postfix}") as bar:

        def tell(fraction: float, message: str) -> None:
            bar.set_postfix_str(message, refresh=False)
            bar.update(max(0, round(min(1.0, fraction) * 100) - bar.n))

        yield tell


def _keep(store: Store, coll: Collection, work: Path, final: Path) -> None:
    """Name the finished archive (`work`/archive.tar) `final`, unless its collection was dropped (or replaced by a
    restore) while its rows were exported: then the archive goes, and the call is a 404 (a 409 when the name is in
    use again). Kept, it would be listed as a snapshot of the name, whose restore would bring back what was
    dropped, over a new collection of that name too. Under the store's lock: a drop comes wholly before or after."""
    with store._mutex:  # noqa: SLF001
        if not coll.dropped:
            os.replace(work / "archive.tar", final)
            return
        shutil.rmtree(work, ignore_errors=True)  # now, not after the lock: the folder must be empty to go
        with contextlib.suppress(OSError):  # empty only if this was the name's first snapshot: earlier ones stay
            final.parent.rmdir()
        taken = coll.name in store._open or (not store.closed and store._row(coll.name) is not None)  # noqa: SLF001
    if taken:
        raise Conflict(f"collection {coll.name!r} was dropped or replaced while its snapshot was written: no "
                       "snapshot was kept; take it again", field="name")  # fmt: skip
    raise NotFound(f"collection {coll.name!r} was dropped while its snapshot was written: no snapshot was kept",
                   field="name")  # fmt: skip


def _link(src: Path, dst: Path) -> None:
    """`src` at `dst` too, as a second name of the same file where the disk allows (an index file is replaced by
    a rename when it is saved again, never written in place: the link keeps this version), else as a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _info(path: Path, manifest: dict[str, Any]) -> SnapshotInfo:
    return SnapshotInfo(
        id=manifest["id"],
        collection=manifest["collection"],
        created_at=manifest["created_at"],
        points=int(manifest["count"]),
        bytes=path.stat().st_size,
        path=str(path),
    )


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        with tarfile.open(path, "r:") as tar:
            first = tar.next()
            if first is None or first.name != "manifest.json":
                raise CorruptData(f"snapshot {path.name} has no manifest")
            fh = tar.extractfile(first)
            manifest = json.loads(fh.read() if fh else b"")
    except CorruptData:
        raise
    except FileNotFoundError:
        raise _gone(path) from None
    except (tarfile.TarError, OSError, ValueError, EOFError) as exc:
        raise CorruptData(f"snapshot {path.name} is not a readable archive: {exc}") from exc
    fmt = manifest.get("format") if isinstance(manifest, dict) else None
    if isinstance(fmt, str) and fmt.startswith("bkg-snapshot/") and fmt != FORMAT:
        raise SchemaTooNew(f"snapshot {path.name} is a {fmt} archive, made by a newer bkg: this bkg reads {FORMAT}; "
                           "restore it with that version")  # fmt: skip
    if fmt != FORMAT:
        raise CorruptData(f"snapshot {path.name} is not a {FORMAT} archive")
    if manifest.get("index") not in KINDS:  # a kind a newer bkg has
        raise SchemaTooNew(f"snapshot {path.name} holds a {manifest.get('index')!r} index, which this bkg does not "
                           f"know ({', '.join(KINDS)}): restore it with a newer bkg")  # fmt: skip
    return manifest


def list_snapshots(root: Path, name: str | None) -> SnapshotList:
    """Return snapshots (of one collection or all), newest first; damaged ones are listed with ok=False (a file
    whose name is not UTF-8 among them, its name escaped); one gone since the folder was read (deleted meanwhile, a
    dangling link) is not listed."""
    dirs = [root / name] if name is not None else sorted(p for p in root.glob("*") if p.is_dir())
    found = []
    for d in dirs:
        for path in d.glob(f"*{SUFFIX}"):
            try:
                if not is_utf8(f"{d.name}/{path.name}"):  # the data dir's own path is the operator's
                    raise CorruptData(f"snapshot {escaped(path.name)}: its name is not UTF-8, rename it")
                manifest = _read_manifest(path)
                if path.stat().st_size < sum(int(p["bytes"]) for p in manifest["parts"].values()):
                    raise CorruptData(f"snapshot {path.name} is truncated")
                found.append(_info(path, manifest))
            except (OSError, NotFound):  # gone since the folder was read
                continue
            except (CorruptData, SchemaTooNew, KeyError, TypeError, ValueError) as exc:
                message = exc.message if isinstance(exc, BkgError) else f"bad manifest: {exc}"
                try:
                    size = path.stat().st_size
                except OSError:
                    continue
                shown = SnapshotInfo(
                    escaped(path.stem), escaped(d.name), "", 0, size, escaped(str(path)), False, message
                )
                found.append(shown)
    found.sort(key=lambda s: s.id, reverse=True)
    return SnapshotList(found)


def _path(root: Path, name: str, snapshot_id: str) -> Path:
    validate.collection_name(name)
    if not isinstance(snapshot_id, str) or not _ID.fullmatch(snapshot_id):
        raise InvalidInput(f"bad snapshot id {snapshot_id!r}", field="snapshot_id")
    path = root / name / f"{snapshot_id}{SUFFIX}"
    if not path.exists():
        raise NotFound(f"collection {name!r} has no snapshot {snapshot_id!r}", field="snapshot_id")
    return path


def delete(root: Path, name: str, snapshot_id: str) -> None:
    """Remove one snapshot archive."""
    path = _path(root, name, snapshot_id)
    try:
        path.unlink()
    except FileNotFoundError:  # another delete took it since `_path` looked
        raise _gone(path) from None


def _gone(path: Path) -> NotFound:
    """An archive deleted between its lookup and its reading (by a delete that ran meanwhile): a 404, not a damaged
    archive's 500."""
    return NotFound(f"snapshot {path.stem!r} was deleted meanwhile", field="snapshot_id")


def _extract_verified(path: Path, work: Path) -> dict[str, Any]:
    """Extract the parts of an archive into `work`, checking each against the manifest's sha256 and size."""
    manifest = _read_manifest(path)
    try:
        with tarfile.open(path, "r:") as tar:
            members = {m.name: m for m in tar.getmembers()}
            for part in (*PARTS, *([TEXT_PART] if TEXT_PART in manifest["parts"] else [])):
                want = manifest["parts"][part]
                member = members.get(part)
                if member is None or not member.isfile():
                    raise CorruptData(f"snapshot {path.name} is missing {part}")
                src = tar.extractfile(member)
                h = hashlib.sha256()
                size = 0
                with open(work / part, "wb") as out:
                    while src is not None and (chunk := src.read(1 << 22)):
                        h.update(chunk)
                        size += len(chunk)
                        out.write(chunk)
                if size != want["bytes"] or h.hexdigest() != want["sha256"]:
                    raise CorruptData(f"snapshot {path.name}: {part} does not match its sha256 in the manifest")
    except CorruptData:
        raise
    except FileNotFoundError:
        raise _gone(path) from None
    except (tarfile.TarError, OSError, KeyError, TypeError, EOFError) as exc:
        raise CorruptData(f"snapshot {path.name} is damaged or truncated: {exc}") from exc
    return manifest


def restore(
    store: Store, name: str, snapshot_id: str, into: str | None, progress: bool | Progress | None = None
) -> Collection:
    """Verify an archive fully, stage it in a new points table, then swap it in with one transaction.

    The store's lock is held only to create the staged table and to swap it in: the archive is read, hashed and
    checked, and the rows loaded into the staged table (on a connection of its own), while other calls go on.
    `progress`: see `reporting` (checked by the caller, `Store.restore_snapshot`)."""
    path, target = check_restore(store, name, snapshot_id, into)
    count = _read_manifest(path).get("count")  # for the bar's default: checked with the rest as it is extracted
    points = count if isinstance(count, int) else 0
    with reporting(progress, f"restore {name}", points) as tell:
        return _restore(store, name, path, target, tell)


def check_restore(store: Store, name: str, snapshot_id: str, into: str | None) -> tuple[Path, str]:
    """What a restore refuses before it reads the archive: a bad or missing snapshot (422, 404), a bad `into` or one
    that another collection holds (422, 409). The archive's path and the collection it restores into."""
    path = _path(store.snapshot_dir, name, snapshot_id)
    target = validate.collection_name(into, "into") if into is not None else name
    if target != name and target in store:
        raise AlreadyExists(f"collection {target!r} already exists: restore into a new name", field="into")
    return path, target


def _restore(store: Store, name: str, path: Path, target: str, tell: Progress) -> Collection:
    con = store._con  # noqa: SLF001
    with tempfile.TemporaryDirectory(dir=store.data_dir, prefix=".restore-") as tmp:
        work = Path(tmp)
        tell(0.0, "verifying the archive")
        m = _extract_verified(path, work)
        tell(0.2, "archive verified; reading the vector index")
        try:
            raw = _faiss().read_index(str(work / "index.faiss"))
        except Exception as exc:
            raise CorruptData(f"snapshot {path.name}: index.faiss cannot be read: {exc}") from exc
        if raw.d != m["dim"] or raw.ntotal != m["next_fid"]:
            raise CorruptData(f"snapshot {path.name}: index.faiss does not match the manifest")
        text = None
        if (work / TEXT_PART).exists():
            # it passed its sha256: what cannot be used now was built another way (another analyser, an older or
            # newer bkg), and is built again from the rows by the first text query, as for an archive without it
            try:
                text, _ = TextIndex.load(work / TEXT_PART)
            except CorruptData as exc:
                log.info("snapshot %s: %s; the full-text index is built again from the rows", path.name, exc)
            if text is not None and text.ntotal != m["next_fid"]:
                log.info("snapshot %s: %s does not match the manifest; built again from the rows", path.name, TEXT_PART)
                text = None
        params = dict(m["params"])
        if m["index"] == "ivf" and getattr(raw, "nlist", 0):
            params["nlist"] = int(raw.nlist)  # the lists it was trained with (the manifest keeps the setting, 0: auto)
        tell(0.4, "loading the points")
        with store._mutex:  # noqa: SLF001
            store._still_open()  # noqa: SLF001 - closed while the archive was checked: a 503, not DuckDB's error
            table = store._new_points_table()  # noqa: SLF001
            loading = store.reading()
        index_file = store.index_path(table)
        text_file = store.text_index_path(table)
        try:
            with loading as load:  # no other call knows this table: it fills without the lock
                rows = f"read_parquet({_sql_path(work / 'points.parquet')})"
                names = {r[0] for r in load.execute(f"DESCRIBE SELECT * FROM {rows}").fetchall()}
                # an archive from before scroll order was kept (no `seq`): its order by position, as it scrolled then
                seq = "coalesce(seq, fid)" if "seq" in names else "fid"
                load.execute(
                    f"INSERT INTO {table} (fid, pk, vec, payload, text, seq) "
                    f"SELECT fid, pk, vec, CAST(payload AS JSON), text, {seq} FROM {rows}"
                )
                if scalar(load, f"SELECT count(*) FROM {table}") != m["count"]:
                    raise CorruptData(f"snapshot {path.name}: points.parquet does not hold {m['count']} points")
            tell(0.7, "points loaded; saving the indexes")
            index = VectorIndex(m["dim"], m["metric"], m["index"], params)
            index.index = raw
            index.save(index_file, {"epoch": 0, "collection": target})
            if text is not None:
                text.save(text_file, {"epoch": 0, "collection": target})
            tell(0.8, "indexes saved; swapping it in")
            # the collection's write lock, then the store's: a write of the collection it replaces ends first
            with store._claimed(target) as old:  # noqa: SLF001
                if target != name and old is not None:  # made meanwhile
                    raise AlreadyExists(f"collection {target!r} already exists: restore into a new name", field="into")
                if old is not None:  # before its table goes: a read that meets the table gone reads this (a 409)
                    old.replaced = True
                try:
                    _swap(con, target, table, m, old)
                except BaseException:
                    if old is not None:
                        old.replaced = False
                    raise
                if old is not None:  # in the same hold of the lock: no call meets a handle on the dropped table
                    old.dropped = True
                    store._open.pop(target, None)  # noqa: SLF001
        except BaseException:
            if not store.closed:  # (closed: its next open sweeps the staged table, and the 503 stays the error)
                with store._mutex, contextlib.suppress(duckdb.Error):  # noqa: SLF001
                    con.execute(f"DROP TABLE IF EXISTS {table}")
            for p in (index_file, meta_path(index_file), text_file):
                p.unlink(missing_ok=True)
            raise
        # swapped in: from here on the restored table is the collection, and nothing undoes that
        with store._mutex:  # noqa: SLF001
            restored = store.collection(target)
        if old is not None:
            old_file = store.index_path(old.table)
            with old._saving:  # noqa: SLF001 - a save of the old handle's under way ends first (none comes after)
                for p in (old_file, meta_path(old_file), store.text_index_path(old.table)):
                    with contextlib.suppress(OSError):
                        p.unlink(missing_ok=True)
        _done(tell, f"restored as {target!r}")
        return restored


def _int(value: Any) -> int:
    """A manifest's count as an int (0 when an older archive has none, or something else)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _swap(con: Any, target: str, table: str, m: dict[str, Any], old: Collection | None) -> None:
    """Name the staged `table` as collection `target` in one transaction, dropping the table `old` had."""
    with transaction(con):
        if old is not None:
            con.execute("DELETE FROM collections WHERE name = ?", [target])
            con.execute(f"DROP TABLE {old.table}")
        # places in a scroll go on past what the archive and the collection it replaces gave out (a cursor given
        # out before never meets a new point at an old place)
        given = max(_int(m.get("next_seq")), old._next_seq if old is not None else 0)  # noqa: SLF001
        con.execute(
            "INSERT INTO collections (name, points_table, dim, metric, index_kind, params, next_fid, embed_model, "
            "next_seq) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [target, table, m["dim"], m["metric"], m["index"], json.dumps(m["params"]), m["next_fid"],
             m.get("embed_model"), given],
        )  # fmt: skip
