"""repoagent's index run: parse the changed files, embed their chunks into the workspace's collection, publish.

`Indexing` is a part of the `RepoAgent` plugin class, whose `repo.index` capability runs `_run_index`.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

from bkg_kernel.errors import NotFound
from bkg_kernel.plugins.repoagent import codeindex
from bkg_kernel.plugins.repoagent.codeindex import CodeIndex, point_id
from bkg_kernel.plugins.repoagent.schemas import IndexRequest, Result
from bkg_kernel.plugins.repoagent.workspaces import Workspaces
from bkg_kernel.runtime.contract import Progress


class Indexing(Workspaces):
    """The index run of `repo.index`, on a workspace's cached index and collection."""

    def _run_index(self, inp: IndexRequest, progress: Progress) -> Result:
        """Index the workspace: see `RepoAgent.index`."""
        ws = self._ws(inp.workspace)
        t0 = time.perf_counter()
        with self._index_lock(ws):  # which `_remove` takes too: the workspace stays while this runs
            if self.workspaces.get(ws.name) is not ws:
                raise NotFound(f"workspace {ws.name!r} was removed before this run began", field="workspace")
            # the run builds on a copy and publishes it once stored: calls meanwhile read the last one whole, and a run
            # that fails leaves the cache as it was saved
            current = self._index(ws, need=False)
            if (inp.full or current.lost) and self._owns_collection(ws):  # lost: what to delete is unknown; a fresh
                with contextlib.suppress(NotFound):  # index would not know either, so it starts over
                    self.store.drop_collection(self._collection(ws))
                idx = CodeIndex()
            else:
                idx = current.copy()
            progress(0.0, f"listing the files of {ws.name}")
            unnamed: list[str] = []
            names = self._files(ws, unnamed)
            embed_model, made = self._ensure_collection(ws)
            if made:  # someone dropped the collection: every file goes in again, not only the changed ones; the saved
                idx = CodeIndex()  # and cached indexes go now, so a run that fails after this starts the next afresh
                with self.lock:
                    (self._dir(ws) / "index.json").unlink(missing_ok=True)
                    self.indexes.pop(ws.name, None)
            t_parse = time.perf_counter()
            changed, before, removed = codeindex.update(ws.path, names, idx, self.settings.max_file_bytes, progress)
            timings = {"list_s": t_parse - t0, "parse_s": time.perf_counter() - t_parse, "embed_s": 0.0, "store_s": 0.0}
            col = self._collection(ws)
            points = self._points(col, changed, before)
            embedded = sum("vector" not in p for p in points)
            for a in range(0, len(points), codeindex.UPSERT_BATCH):  # new chunks first, then the surplus old ones
                batch = points[a : a + codeindex.UPSERT_BATCH]
                todo = [p for p in batch if "vector" not in p]
                t1 = time.perf_counter()
                if todo:  # the head of a chunk is embedded, its whole text goes to BM25
                    vecs = self.store.embed(embed_model, [p.pop("embed") for p in todo])
                    for p, v in zip(todo, vecs, strict=True):
                        p["vector"] = v.tolist()
                for p in batch:
                    p.pop("embed", None)
                t2 = time.perf_counter()
                self.store.upsert(col, batch)
                timings["embed_s"] += t2 - t1
                timings["store_s"] += time.perf_counter() - t2
                progress(0.5 + 0.5 * (a + codeindex.UPSERT_BATCH) / len(points), f"embedded {a}/{len(points)} chunks")
            stale = [point_id(p, i) for p, old in before.items() for i in range(len(changed.get(p, [])), len(old))]
            for a in range(0, len(stale), 1000):
                self.store.delete(col, stale[a : a + 1000])
            idx.indexed_at = time.time()
            # never true while `_remove` needs the lock held here; were it, nothing would be saved for a freed name
            if self.workspaces.get(ws.name) is not ws:
                raise NotFound(f"workspace {ws.name!r} was removed while it was indexed", field="workspace")
            idx.save(self._dir(ws) / "index.json")
            summary = idx.summary()
            with self.lock:
                self.indexes[ws.name] = idx
                counts = {k: v for k, v in summary.items() if k != "parse_errors"}  # the collection is ours: noted
                ws.info = {"file_count": len(names), "collection": col, **counts}
                self._save()
        took = time.perf_counter() - t0
        progress(1.0, f"indexed {len(changed)} changed files in {took:.1f} s")
        return Result(
            workspace=ws.name, files=len(idx.files), changed=sorted(changed), removed=removed, upserted=len(points),
            embedded=embedded, timings={k: round(v, 3) for k, v in timings.items()},
            took_s=round(took, 3), unnamed=unnamed, **{k: v for k, v in summary.items() if k != "files"},
        )  # fmt: skip

    def _points(
        self, col: str, changed: dict[str, list[dict[str, Any]]], before: dict[str, list[dict[str, Any]]]
    ) -> list[dict[str, Any]]:
        """The points to upsert for the changed files. A chunk whose id, text and span are unchanged is left
        as it is; one whose text an old chunk of its file had reuses that chunk's vector; the rest are
        embedded by the store."""
        fields = ("start", "end", "kind", "symbol")
        points, reuse = [], {}
        for path, chunks in changed.items():
            old = before.get(path, [])
            old_ids = {c.get("th"): point_id(path, i) for i, c in enumerate(old)}
            for i, c in enumerate(chunks):
                prev = old[i] if i < len(old) else None
                if prev is not None and prev.get("th") == c["th"] and all(prev[k] == c[k] for k in fields):
                    continue
                payload = {"path": path, **{k: c[k] for k in fields}}
                point = {"id": point_id(path, i), "text": c["text"], "embed": c["embed"], "payload": payload}
                if c["th"] in old_ids:
                    reuse[point["id"]] = old_ids[c["th"]]
                points.append(point)
        if reuse:  # read the old vectors before any upsert overwrites their ids
            wanted = sorted(set(reuse.values()))
            vectors = {p["id"]: p["vector"] for p in self.store.get(col, wanted, with_vectors=True)}
            for p in points:
                src = reuse.get(p["id"])
                if src is not None and src in vectors:
                    p["vector"] = vectors[src]
        return points
