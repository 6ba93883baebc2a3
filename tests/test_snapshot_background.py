"""A snapshot or a restore over HTTP as a background job that reports its steps (`?background=true`: 202 and a job,
its result what the 201 holds), as a model download is; the notebook client shows it with a bar (`progress=True`,
by default for 50,000 points or more). What the call could refuse at once is refused at once (404, 409, 403), not a
failed job. A real gateway, a real store."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from gateway_harness import Gateway, start_gateway, user_key

from bkg_kernel.client import Workbench
from bkg_kernel.errors import InvalidInput

DIM = 8


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    g = start_gateway(tmp_path_factory.mktemp("snapjobs") / "data", plugins=["sysinfo"])
    c = g.client()
    assert c.post("/api/collections", json={"name": "docs", "dim": DIM}).status_code in (200, 201)
    points = [{"id": i, "vector": [float(i % 7 + j) for j in range(DIM)], "payload": {"n": i}, "text": f"point {i}"}
              for i in range(300)]  # fmt: skip
    assert c.put("/api/collections/docs/points", json={"points": points}).status_code == 200
    yield g
    g.stop()


def test_a_snapshot_and_a_restore_run_as_jobs_that_report_their_steps(gw: Gateway) -> None:
    c = gw.client()
    r = c.post("/api/collections/docs/snapshots", params={"background": "true"})
    assert r.status_code == 202, r.text
    job = gw.wait_job(r.json()["job"]["id"])
    assert job["state"] == "done" and job["kind"] == "snapshot.create", job
    snap = job["result"]
    assert snap["points"] == 300 and snap["collection"] == "docs"
    assert job["message"] == f"snapshot {snap['id']} written" and job["progress"] == 1.0  # its steps, to the end
    assert snap["id"] in [s["id"] for s in c.get("/api/collections/docs/snapshots").json()["snapshots"]]

    r = c.post(f"/api/collections/docs/snapshots/{snap['id']}/restore", json={"into": "docs-copy"},
               params={"background": "true"})  # fmt: skip
    assert r.status_code == 202, r.text
    job = gw.wait_job(r.json()["job"]["id"])
    assert job["state"] == "done" and job["result"]["name"] == "docs-copy" and job["result"]["count"] == 300, job
    assert job["message"] == "restored as 'docs-copy'"
    hits = c.post("/api/collections/docs-copy/query", json={"text": "point 42", "k": 1, "mode": "text"}).json()
    assert hits["results"][0]["id"] == 42, hits
    audit = [e["action"] for e in c.get("/admin/audit", params={"limit": 20}).json()["entries"]]
    assert "snapshot.create" in audit and "snapshot.restore" in audit


def test_what_a_background_snapshot_could_refuse_at_once_is_refused_at_once(gw: Gateway) -> None:
    c = gw.client()
    snap = c.post("/api/collections/docs/snapshots").json()
    r = c.post("/api/collections/nope/snapshots", params={"background": "true"})
    assert r.status_code == 404 and r.json()["error"]["field"] == "name", r.text
    r = c.post("/api/collections/docs/snapshots/20000101T000000000000Z-abcdef/restore", params={"background": "true"})
    assert r.status_code == 404 and r.json()["error"]["field"] == "snapshot_id", r.text
    r = c.post(f"/api/collections/docs/snapshots/{snap['id']}/restore", json={"into": "docs"},
               params={"background": "true"})  # fmt: skip
    assert r.status_code == 202  # into itself: a replacement, as without background
    assert gw.wait_job(r.json()["job"]["id"])["state"] == "done"
    c.post("/api/collections", json={"name": "taken", "dim": DIM})
    r = c.post(f"/api/collections/docs/snapshots/{snap['id']}/restore", json={"into": "taken"},
               params={"background": "true"})  # fmt: skip
    assert r.status_code == 409 and r.json()["error"]["field"] == "into", r.text
    reader = user_key(gw, "snap-reader", ["collections:read"])
    r = gw.client(reader).post("/api/collections/docs/snapshots", params={"background": "true"})
    assert r.status_code == 403, r.text
    r = c.post("/api/collections/docs/snapshots", params={"background": "maybe"})
    assert r.status_code == 422 and "background" in r.json()["error"]["field"], r.text


def test_the_notebook_client_shows_a_snapshot_and_a_restore_as_jobs(gw: Gateway, tmp_path: Path) -> None:
    wb = Workbench(gw.url, gw.client().headers["Authorization"].split()[1])
    docs = wb.collection("docs")
    jobs_before = {j["id"] for j in wb.jobs() if j.get("kind") == "snapshot.create"}
    snap = docs.snapshot(progress=True)
    assert snap.points == 300 and snap.collection == "docs"
    made = {j["id"] for j in wb.jobs() if j.get("kind") == "snapshot.create"} - jobs_before
    assert len(made) == 1  # it ran as a job (its bar followed it)
    copy = docs.restore(snap.id, into="docs-copy2", progress=True)
    assert copy.name == "docs-copy2" and copy.count == 300
    quiet = docs.snapshot()  # 300 points: one call, no job
    assert quiet.points == 300 and {j["id"] for j in wb.jobs() if j.get("kind") == "snapshot.create"} == (
        jobs_before | made
    )
    with pytest.raises(InvalidInput) as bad:
        docs.snapshot(progress="yes")  # type: ignore[arg-type]
    assert bad.value.field == "progress"


def test_a_failed_job_raises_in_a_notebook_what_the_call_raises_without_one(gw: Gateway) -> None:
    """Found by a review: past 50,000 points the client follows a job, and a damaged archive raised `JobFailed`
    there, `CorruptData` below: the same call raised another error by the collection's size. The job keeps the
    error's code (and field), and the client raises it."""
    from bkg_kernel.errors import CorruptData

    wb = Workbench(gw.url, gw.client().headers["Authorization"].split()[1])
    docs = wb.collection("docs")
    snap = docs.snapshot()
    archive = gw.data_dir / "snapshots" / "docs" / f"{snap.id}.bkgsnap"
    archive.write_bytes(archive.read_bytes()[:4000])  # cut short
    for progress in (False, True):
        with pytest.raises(CorruptData):
            docs.restore(snap.id, into=f"broken-{progress}", progress=progress)
    r = gw.client().post(f"/api/collections/docs/snapshots/{snap.id}/restore", json={"into": "broken-rest"},
                         params={"background": "true"})  # fmt: skip
    job = gw.wait_job(r.json()["job"]["id"])
    assert job["state"] == "failed" and job["error_code"] == "corrupt_data" and job["error_status"] == 500, job
    auditor = user_key(gw, "snap-auditor", ["admin:audit", "plugins:read"])  # sees the job, not what it said
    seen = gw.client(auditor).get(f"/api/jobs/{job['id']}").json()
    assert seen["error"] == "failed" and seen["error_code"] is None and seen["error_field"] is None, seen
    assert "broken-rest" not in [c["name"] for c in gw.client().get("/api/collections").json()["collections"]]


def test_snapshots_and_restores_as_jobs_are_bounded_and_a_429_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by a review: each `?background=true` call started a thread of its own, however many ran (each exports
    or loads a whole collection). Past `MAX_SNAPSHOTS` running, a 429 at once; a slot comes back when a job ends;
    the notebook client, refused a job, waits for a slot (the bound holds for it too). The real app on
    uvicorn in this process, a real store; the snapshot's work is a stand-in that waits until released, so that
    the jobs are still running when the next one is asked for."""
    import socket
    import threading
    import time

    import httpx
    import uvicorn
    from gateway_harness import ADMIN_KEY, wait_for

    from bkg_kernel.gateway.app import create_app
    from bkg_kernel.gateway.routes import collections as routes
    from bkg_kernel.settings import Settings
    from bkg_kernel.store import snapshots

    release, entered = threading.Event(), []
    real = snapshots.create

    def held_snapshot(store: Any, coll: Any, progress: Any = None) -> Any:  # a stand-in: waits, then the real one
        entered.append(progress)
        release.wait(60)
        return real(store, coll, progress)

    monkeypatch.setattr(snapshots, "create", held_snapshot)
    app = create_app(Settings(data_dir=tmp_path / "data", admin_key=ADMIN_KEY), plugins=["sysinfo"])
    sock = socket.create_server(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_level="critical"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_for(lambda: server.started, timeout=60)
    try:
        c = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60)
        assert c.post("/api/collections", json={"name": "held", "dim": DIM}).status_code == 201
        jobs = []
        for _ in range(routes.MAX_SNAPSHOTS):
            r = c.post("/api/collections/held/snapshots", params={"background": "true"})
            assert r.status_code == 202, r.text
            jobs.append(r.json()["job"]["id"])
        r = c.post("/api/collections/held/snapshots", params={"background": "true"})
        assert r.status_code == 429 and "snapshots or restores are running" in r.json()["error"]["message"], r.text
        # one that runs in the call counts too (it exports as much), and so does a restore
        r = c.post("/api/collections/held/snapshots")
        assert r.status_code == 429 and "snapshots or restores are running" in r.json()["error"]["message"], r.text
        r = c.post("/api/collections/held/snapshots/missing-one/restore")
        assert r.status_code == 429, r.text
        assert len(entered) == routes.MAX_SNAPSHOTS  # neither started

        wb = Workbench(url, ADMIN_KEY)
        done: list[Any] = []
        waiting = threading.Thread(target=lambda: done.append(wb.collection("held").snapshot(progress=True)))
        waiting.start()  # refused a job: it waits for a slot (the bound holds), then runs as a job
        time.sleep(2.5)  # the client asks again meanwhile, and is refused again: nothing of it has started
        assert not done and len(entered) == routes.MAX_SNAPSHOTS
        quiet: list[Any] = []  # a call without a job, refused, waits for a slot too
        waiting_too = threading.Thread(target=lambda: quiet.append(wb.collection("held").snapshot(progress=False)))
        waiting_too.start()
        time.sleep(1.5)
        assert not quiet and len(entered) == routes.MAX_SNAPSHOTS
        release.set()
        waiting.join(60)
        waiting_too.join(60)
        assert quiet and quiet[0].collection == "held"
        assert done and done[0].collection == "held"
        late = entered[routes.MAX_SNAPSHOTS :]
        assert len(late) == 2 and False in late  # the call's own: no bar
        assert any(callable(e) for e in late)  # the job's: it reports its steps
        assert len([j for j in wb.jobs() if j.get("kind") == "snapshot.create"]) == len(jobs) + 1
        wait_for(lambda: all(c.get(f"/api/jobs/{j}").json()["state"] == "done" for j in jobs), 60, every=0.1)
        r = c.post("/api/collections/held/snapshots", params={"background": "true"})  # the slots came back
        assert r.status_code == 202, r.text
        wait_for(lambda: c.get(f"/api/jobs/{r.json()['job']['id']}").json()["state"] == "done", 60, every=0.1)
    finally:
        release.set()
        server.should_exit = True
        thread.join(20)
