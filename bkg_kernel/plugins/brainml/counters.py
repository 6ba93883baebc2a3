"""brainml's counters per collection (queries, their latency, the last index), kept in its work dir's stats.json.

Each collection's counters belong to the collection they were counted on, known by its `created_at`: a collection
dropped and made again under the same name starts from zero, where they used to carry over by name. A query is
counted without asking the store who the collection is (that is a describe, which checkpoints the database, on
every 5 ms query); its counters are tied to the collection the next time brainml describes it (an index, the
stats), and dropped then when that is another collection than theirs.
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path
from typing import Any

from bkg_kernel import statefiles
from bkg_kernel.errors import CorruptData
from bkg_kernel.store.validate import COLLECTION_NAME_PATTERN

Entry = dict[str, Any]


def fresh(created_at: str | None) -> Entry:
    """Counters at zero for the collection made at `created_at` (None: not known yet)."""
    return {"created_at": created_at, "queries": 0, "query_ms_total": 0.0, "last_index": None}


def _entry(value: Any) -> Entry | None:
    """A stored entry as this version keeps it, or None for one it cannot read (the file is only counters)."""
    if not isinstance(value, dict):
        return None
    e = fresh(value.get("created_at") if isinstance(value.get("created_at"), str) else None)
    for key in ("queries", "query_ms_total", "last_index"):
        v = value.get(key)
        if isinstance(v, int | float) and not isinstance(v, bool) and v >= 0:
            e[key] = v
    e["queries"] = int(e["queries"])
    return e


class Counters:
    """`queried`, `indexed`, `of` and `forget`, by collection name; thread safe (brainml runs inline, on threads)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = threading.Lock()
        self.saved_at = 0.0
        self.data: dict[str, Entry] = {}
        statefiles.sweep(path)
        if path.exists():
            try:  # counters and dates only: a damaged file is set aside and counting starts again
                raw = statefiles.load(path)
            except CorruptData as exc:
                statefiles.set_aside(path, exc.message)
            else:
                named = (k for k in raw if re.fullmatch(COLLECTION_NAME_PATTERN, k))  # a name no store can describe:
                self.data = {k: e for k in named if (e := _entry(raw[k])) is not None}  # it failed every listing

    def save(self, at_most_every: float = 0.0) -> None:
        """Write the counters; with `at_most_every`, skip it when the last write is that recent (query counters: a
        crash loses at most that many seconds of them)."""
        with self.lock:
            self._save(at_most_every)

    def _save(self, at_most_every: float = 0.0) -> None:
        now = time.monotonic()
        if now - self.saved_at < at_most_every:
            return
        statefiles.write_json(self.path, self.data, durable=False)
        self.saved_at = now

    def names(self) -> list[str]:
        """The collections counted, sorted (a copy: others count on meanwhile)."""
        with self.lock:
            return sorted(self.data)

    def entry(self, name: str) -> Entry | None:
        """The counters of `name` as they stand (the object itself: what `forget` compares)."""
        with self.lock:
            return self.data.get(name)

    def _confirmed(self, name: str, created_at: str) -> Entry:
        """The counters of the collection `name` made at `created_at`: those counted before its identity was known
        are taken over, another collection's are dropped. Either way a new object (see `forget`)."""
        e = self.data.get(name)
        if e is not None and e["created_at"] == created_at:
            return e
        e = {**e, "created_at": created_at} if e is not None and e["created_at"] is None else fresh(created_at)
        self.data[name] = e
        return e

    def queried(self, name: str, ms: float) -> None:
        """Count one query of `ms` milliseconds."""
        with self.lock:
            e = self.data.get(name)
            if e is None:
                e = self.data[name] = fresh(None)
            e["queries"] += 1
            e["query_ms_total"] += ms
            self._save(at_most_every=1.0)

    def indexed(self, name: str, created_at: str) -> None:
        """Note an index call into the collection `name` made at `created_at`."""
        with self.lock:
            self._confirmed(name, created_at)["last_index"] = time.time()
            self._save()

    def of(self, name: str, created_at: str) -> Entry:
        """A copy of the counters of the collection `name` made at `created_at` (zeros for one never counted)."""
        with self.lock:
            before = self.data.get(name)
            if before is None:  # not kept: asking about a collection does not list it
                return fresh(created_at)
            e = self._confirmed(name, created_at)
            if e is not before:
                self._save(at_most_every=1.0)
            return dict(e)

    def forget(self, name: str, seen: Entry | None) -> None:
        """Drop the counters of a collection found gone, when they are still `seen` (`entry`, taken before the store
        said so): a call that made the name again meanwhile has counters of its own by then."""
        with self.lock:
            if seen is not None and self.data.get(name) is seen:
                del self.data[name]
                self._save(at_most_every=1.0)
