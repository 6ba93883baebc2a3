"""Notebook jobs, defects found by a fifth review, on a real gateway with real job workers and kernels (and the job
service in this process on a real store, with a clock the test moves, for a schedule's fire): a listing of runs
leaves large parameters out (a run's own GET has them), paging goes on when the run a page ended with is deleted,
and a schedule's last fire never moves back."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from gateway_harness import Gateway, start_gateway, submit, user_key, wait_for, wait_run
from helpers import notebook

pytestmark = pytest.mark.slow
BIG = "q" * 200_000  # a run's parameter: 200 KB of JSON
BIG_BYTES = len(json.dumps({"blob": BIG}))


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("r5roots").resolve()
    notebook(root / "big.ipynb", "blob = ''", "print('blob', len(blob))")
    notebook(root / "slow.ipynb", "seconds = 120.0\nblob = ''", "import time\ntime.sleep(seconds)")
    notebook(root / "hello.ipynb", "n = 1", "print('hello', n)")
    return root


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, roots: Path) -> Iterator[Gateway]:
    data = tmp_path_factory.mktemp("jobs_review5") / "data"
    g = start_gateway(data, env={"BKG_JOB_ROOTS": str(roots)}, plugins=["sysinfo"])
    yield g
    g.stop()


def test_a_listing_leaves_large_parameters_out_and_the_run_itself_has_them(gw: Gateway) -> None:
    """Found by a review: GET /api/jobs read every run with `SELECT *`, so each run's parameters (up to 1 MiB) were
    read, parsed and sent on every listing: 40 runs of 1 MiB made a 40 MB answer and slowed the gateway. A listing
    now carries parameters up to 4 KiB of JSON, a larger one as null with its size (`parameters_bytes`), a run still
    going too; GET /api/jobs/{id}, a retry, `wb.jobs.list()` and `bkg jobs list` still work with the whole."""
    from bkg_kernel.client import Workbench
    from bkg_kernel.client.jobs import Run

    key = user_key(gw, "heavy", ["jobs:run", "plugins:read"])
    c = gw.client(key)
    big = [submit(gw, {"notebook": "big.ipynb", "parameters": {"blob": BIG}}, key)["id"] for _ in range(3)]
    small = submit(gw, {"notebook": "big.ipynb", "parameters": {"blob": "small"}}, key)["id"]
    for run_id in [*big, small]:
        assert wait_run(gw, run_id, key)["state"] == "succeeded"
    going = submit(gw, {"notebook": "slow.ipynb", "parameters": {"blob": BIG}}, key)["id"]  # listed from memory
    try:
        r = c.get("/api/jobs", params={"limit": 100})
        assert r.status_code == 200, r.text
        assert len(r.content) < 20_000, len(r.content)  # four runs of 200 KB: not in it
        listed = {j["id"]: j for j in r.json()["jobs"]}
        assert set(listed) == {*big, small, going}
        for run_id in [*big, going]:
            assert listed[run_id]["parameters"] is None and listed[run_id]["parameters_bytes"] == BIG_BYTES
        assert listed[going]["finished_at"] is None  # the live run's, sized from memory
        assert listed[small]["parameters"] == {"blob": "small"}
        assert listed[small]["parameters_bytes"] == len(json.dumps({"blob": "small"}))
        whole = c.get(f"/api/jobs/{big[0]}")
        assert whole.status_code == 200 and whole.json()["parameters"] == {"blob": BIG}
        assert c.get(f"/api/jobs/{going}").json()["parameters"] == {"blob": BIG}
        # a retry runs with the run's own parameters, not the listing's
        again = c.post(f"/api/jobs/{big[1]}/retry")
        assert again.status_code == 202, again.text
        redone = wait_run(gw, again.json()["id"], key)
        assert redone["state"] == "succeeded" and redone["parameters"] == {"blob": BIG}
        # the notebook client: the table lists them, a listed run says where its parameters are, `get` has them
        wb = Workbench(gw.url, key)
        table = wb.jobs.list(100)
        assert {row["id"] for row in table} == {*big, small, going, again.json()["id"]}
        assert f"{BIG_BYTES:,} bytes" in Run(next(row for row in table if row["id"] == big[0]))._repr_html_()
        assert wb.jobs.get(big[2])["parameters"] == {"blob": BIG}
        env = {**os.environ, "BKG_GATEWAY_URL": gw.url, "BKG_API_KEY": key}
        shown = subprocess.run([sys.executable, "-m", "bkg_kernel.cli", "jobs", "list", "--limit", "100"],
                               capture_output=True, text=True, env=env, timeout=180)  # fmt: skip
        assert shown.returncode == 0 and len(shown.stdout.splitlines()) == 6, shown.stdout + shown.stderr
    finally:
        c.post(f"/api/jobs/{going}/cancel")
    assert wait_run(gw, going, key)["state"] == "cancelled"


def test_paging_goes_on_when_the_run_a_page_ended_with_is_deleted(gw: Gateway) -> None:
    """Found by a review: a page's `next_before` was the id of its last run, and `?before=<id>` looked that run up:
    once it was deleted (by its owner, or pruned) the next page was a 404 and the older runs out of reach
    (`wb.jobs.list` raised half way). `next_before` now holds the (created_at, id) it stands for; a run id that
    exists is still a `before`, and one that holds nothing is a 4xx naming `before`."""
    from bkg_kernel.client import Workbench

    key = user_key(gw, "pager", ["jobs:run", "plugins:read"])
    c = gw.client(key)
    made = [submit(gw, {"notebook": "hello.ipynb", "parameters": {"n": i}}, key)["id"] for i in range(6)]
    for run_id in made:
        assert wait_run(gw, run_id, key)["state"] == "succeeded"
    ids = [j["id"] for j in c.get("/api/jobs").json()["jobs"]]
    assert sorted(ids) == sorted(made)
    first = c.get("/api/jobs", params={"limit": 2}).json()
    assert [j["id"] for j in first["jobs"]] == ids[:2] and first["next_before"]
    assert c.delete(f"/api/jobs/{ids[1]}").status_code == 204  # the run the page ended with
    second = c.get("/api/jobs", params={"limit": 2, "before": first["next_before"]})
    assert second.status_code == 200, second.text
    assert [j["id"] for j in second.json()["jobs"]] == ids[2:4]
    # the notebook client: a page, its last run deleted, then the rest from its next_before
    wb = Workbench(gw.url, key)
    page = wb.jobs.page(1, second.json()["next_before"])
    assert [j["id"] for j in page["jobs"]] == ids[4:5]
    assert c.delete(f"/api/jobs/{ids[4]}").status_code == 204
    assert [r["id"] for r in wb.jobs.list(10, before=page["next_before"])] == ids[5:]
    assert [r["id"] for r in wb.jobs.list(10, before=ids[2])] == [ids[3], ids[5]]  # a run id that exists
    gone = c.get("/api/jobs", params={"before": ids[1]})  # a run id that names nothing now
    assert gone.status_code == 404 and gone.json()["error"]["field"] == "query.before", gone.text
    wrong = ["page-" + base64.urlsafe_b64encode(raw).decode() for raw in (b'["x", 1]', b'[1e999, "a"]', b"[1, 2]")]
    for bad in ("page-!!", "page-", "page-e30", *wrong):  # not base64, nothing, {}, a page of no (time, id)
        r = c.get("/api/jobs", params={"before": bad})
        assert r.status_code == 422 and r.json()["error"]["field"] == "query.before", (bad, r.text)


def _schedule_row(sid: str, last_fire: float | None) -> dict[str, Any]:
    return {"id": sid, "notebook": "hello.ipynb", "parameters": {}, "cron": "0 * * * *", "timezone": "UTC",
            "enabled": True, "owner": "sam", "owner_id": "u-sam", "scopes": ["jobs:run"], "created_at": 1.0,
            "last_fire": last_fire, "path": "/nowhere/hello.ipynb"}  # fmt: skip


def test_a_fire_recorded_after_a_cron_edit_never_moves_the_last_fire_back(tmp_path: Path) -> None:
    """Found by a review: a fire's `mark_fired` wrote its fire time as the schedule's last fire; when it landed after
    an edit of the cron (which sets the last fire to the edit's time), it moved the last fire back, and the next tick
    ran a fire of the new cron from before the edit. The last fire only moves forward (and is set from none)."""
    from bkg_kernel.jobs.history import History
    from bkg_kernel.store import Store

    with Store(tmp_path / "data") as store:
        h = History(store)
        h.save_schedule(_schedule_row("sched-a", None))
        h.mark_fired("sched-a", 3600.0, "run-1")  # none before: set
        assert h.schedule("sched-a")["last_fire"] == 3600.0  # type: ignore[index]
        assert h.update_schedule("sched-a", {"cron": "*/5 * * * *", "last_fire": 7620.0})  # the edit, at H+7m
        h.mark_fired("sched-a", 7200.0, "run-2")  # the fire at H, read before the edit, recorded after it
        s = h.schedule("sched-a")
        assert s is not None and s["last_fire"] == 7620.0 and s["last_run_id"] == "run-2"
        h.mark_fired("sched-a", 7800.0, None)  # a later fire moves it on
        s = h.schedule("sched-a")
        assert s is not None and s["last_fire"] == 7800.0 and s["last_run_id"] == "run-2"


def test_a_cron_edit_during_a_fire_runs_no_fire_of_the_new_cron_from_before_it(tmp_path: Path, roots: Path) -> None:
    """The review's interleaving, forced: the hourly fire at H is on its way to `mark_fired` when the cron becomes
    `*/5` at H+7m (counting from then); once the fire is recorded the next tick, at the same instant, fires nothing
    (it had run the */5 fire of H+5m, from before the edit)."""
    from bkg_kernel.auth import AuthService, Principal
    from bkg_kernel.jobs.service import JobService
    from bkg_kernel.settings import Settings
    from bkg_kernel.store import Store

    t0 = 1_800_000_000.0
    hour = (t0 // 3600 + 1) * 3600  # the first hour after t0
    now = [t0]
    settings = Settings(job_roots=[roots], job_workers=1, job_tick_s=60)  # its own ticks: at start, then in 60 s
    store = Store(tmp_path / "data")
    auth = AuthService(store)
    u = auth.create_user("sam", "developer", actor="test")
    p = Principal(u["id"], "sam", "developer", frozenset(auth.roles["developer"]))
    svc = JobService(settings, store, auth, lambda *a: None, "http://127.0.0.1:9", clock=lambda: now[0])
    entered, release = threading.Event(), threading.Event()
    real = svc.history.mark_fired

    def held(*a: Any) -> None:  # the real call, held until the edit was answered
        entered.set()
        assert release.wait(30)
        real(*a)

    async def scenario() -> tuple[list[dict[str, Any]], float, list[dict[str, Any]]]:
        await svc.start(recover=False)
        try:
            s = await svc.add_schedule(p, {"notebook": "hello.ipynb", "cron": "0 * * * *"})
            now[0] = hour + 7 * 60
            svc.history.mark_fired = held  # type: ignore[method-assign,assignment]
            tick = asyncio.create_task(svc.tick())
            assert await asyncio.to_thread(entered.wait, 30)  # the fire at H: its run queued, its record held
            edited = await svc.update_schedule(s["id"], {"cron": "*/5 * * * *"}, p)
            assert edited["last_fire"] == hour + 7 * 60
            release.set()
            first = await tick
            svc.history.mark_fired = real  # type: ignore[method-assign]
            stored = svc.history.schedule(s["id"])
            assert stored is not None
            await asyncio.to_thread(wait_for, lambda: not svc.live, 120)  # its run ended: no overlap rule applies
            second = await svc.tick()  # the same instant: no fire time of the new cron since the edit
            await asyncio.to_thread(wait_for, lambda: not svc.live, 120)
            return first, stored["last_fire"], second
        finally:
            await svc.close()

    try:
        first, last_fire, second = asyncio.run(scenario())
    finally:
        auth.close()
        store.close()
    assert len(first) == 1  # the hourly fire, on its way before the edit, ran
    assert last_fire == hour + 7 * 60, last_fire - hour
    assert second == [], second


def test_a_runs_events_carry_large_parameters_no_more_than_a_listing(gw: Gateway) -> None:
    """Found by a review: every event of a run (queued, each cell, its end) carried its parameters whole, so a run
    of 1 MiB of them sent that much to each subscriber of `jobs` at every cell, encoded on the event loop. Events
    now carry them as a listing does: a large one as null with its size; a small one whole."""
    from websockets.sync.client import connect as ws_connect

    key = user_key(gw, "watcher", ["jobs:run", "plugins:read"])
    with ws_connect(gw.url.replace("http", "ws") + f"/ws?token={key}", max_size=2**24) as ws:
        assert json.loads(ws.recv(10))["type"] == "bootstrap"
        ws.send(json.dumps({"action": "sub", "topic": "jobs"}))
        assert json.loads(ws.recv(10))["type"] == "ack"
        big = submit(gw, {"notebook": "big.ipynb", "parameters": {"blob": BIG}}, key)["id"]
        small = submit(gw, {"notebook": "hello.ipynb", "parameters": {"n": 2}}, key)["id"]
        events: dict[str, list[dict[str, Any]]] = {big: [], small: []}
        sizes: list[int] = []
        while not all(e and e[-1].get("finished_at") for e in events.values()):
            raw = ws.recv(180)
            msg = json.loads(raw)
            if msg["type"] == "jobs" and msg["payload"]["id"] in events:
                events[msg["payload"]["id"]].append(msg["payload"])
                if msg["payload"]["id"] == big:
                    sizes.append(len(raw))
    assert len(events[big]) >= 3 and max(sizes) < 20_000, sizes  # queued, running, cells, the end
    assert all(e["parameters"] is None and e["parameters_bytes"] == BIG_BYTES for e in events[big])
    assert all(e["parameters"] == {"n": 2} for e in events[small])
    assert wait_run(gw, big, key)["parameters"] == {"blob": BIG}  # the run itself has them
