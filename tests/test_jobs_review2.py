"""Notebook jobs, defects found by a second review, against a real gateway with real job workers and kernels (and
the job service in this process on a real store, with a clock the test moves, where a schedule's fire is the point):
one rule for what a run printed (GET /api/jobs/{id}, its output and the WebSocket alike), a background job's scope
given at start, an owner stopping their own schedule without `jobs:run`, a run's printed output capped, and a
schedule made before migration 0011 held to the file its name meant."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import nbformat
import pytest
from gateway_harness import Gateway, start_gateway, submit, wait_run
from helpers import notebook

pytestmark = pytest.mark.slow
SECRET = "row 7 is 5f1d"  # what the failing cell prints (its error value and traceback hold it)
LIMIT = 1024 * 1024  # the gateway's job_max_output_bytes here (10 MiB by default)
LOUD = LIMIT + 512 * 1024  # bytes the loud notebook's first cell prints: 512 KiB past what a run keeps


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("jobroots2")
    notebook(root / "secret.ipynb", "word = 'row 7'", "raise ValueError(word + ' is 5f1d')")
    notebook(root / "loud.ipynb", "n = 1024",
             "line = 'x' * 1023\nfor _ in range(n // 1024):\n    print(line)",
             "print('the tail of it')",
             "{'rich': 'kept'}")  # fmt: skip
    notebook(root / "progress.ipynb", "steps = 300",
             "from IPython.display import clear_output\nfor i in range(steps):\n"
             "    clear_output(wait=True)\n    print(f'step {i} ' + 'x' * 10_000)",
             "from IPython.display import clear_output\nfor i in range(100):\n"
             "    print('y' * 10_000)\n    clear_output()",
             "print('final accuracy 0.97')")  # fmt: skip
    return root


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, root: Path) -> Iterator[Gateway]:
    env = {"BKG_JOB_ROOTS": str(root), "BKG_JOB_MAX_OUTPUT_BYTES": str(LIMIT)}
    g = start_gateway(tmp_path_factory.mktemp("jobs_review2") / "data", env=env, plugins=["sysinfo"])
    yield g
    g.stop()


def _user(gw: Gateway, name: str, role: str) -> dict[str, Any]:
    r = gw.client().post("/admin/users", json={"username": name, "role": role})
    assert r.status_code == 201, r.text
    return dict(r.json())


def _key(gw: Gateway, user_id: str | None = None, **body: Any) -> str:
    r = gw.client().post("/admin/keys", json={"name": "k", **({"user_id": user_id} if user_id else {}), **body})
    assert r.status_code == 201, r.text
    return str(r.json()["key"])


def test_an_owners_narrower_key_sees_no_more_of_a_run_than_its_output_route_gives_it(gw: Gateway) -> None:
    """Found by a review: the owner's key narrowed to plugins:read (a lab kernel's, say) was refused a failed run's
    output notebook but read its error value and traceback through GET /api/jobs/{id}, the listing and the
    WebSocket, and a background job's result too. One rule now: what a job's work printed or made is for who holds
    the scopes it ran with, the owner's key too; the rest sees that it failed and how."""
    from websockets.sync.client import connect as ws_connect

    narrow = _key(gw, scopes=["plugins:read"])  # the admin's own key, narrowed
    admin, mine = gw.client(), gw.client(narrow)
    with ws_connect(gw.url.replace("http", "ws") + f"/ws?token={narrow}") as ws:
        assert json.loads(ws.recv(10))["type"] == "bootstrap"
        ws.send(json.dumps({"action": "sub", "topic": "jobs"}))
        assert json.loads(ws.recv(10))["type"] == "ack"
        run = submit(gw, {"notebook": "secret.ipynb"})
        job = admin.post("/api/plugins/sysinfo/invoke/sysinfo.survey", json={"samples": 2, "every_s": 0.05})
        assert job.status_code == 202, job.text
        job_id = job.json()["job"]["id"]
        events: dict[str, list[dict[str, Any]]] = {run["id"]: [], job_id: []}
        while not all(e and e[-1]["finished"] for e in events.values()):
            msg = json.loads(ws.recv(120))
            if msg["type"] == "jobs" and msg["payload"]["id"] in events:
                events[msg["payload"]["id"]].append(msg["payload"])
    full = wait_run(gw, run["id"])
    assert full["state"] == "failed" and SECRET in full["error"]["evalue"] and SECRET in full["error"]["traceback"]
    assert admin.get(f"/api/jobs/{run['id']}/output").status_code == 200
    seen = mine.get(f"/api/jobs/{run['id']}").json()
    assert seen["state"] == "failed" and seen["error"]["ename"] == "ValueError", seen
    assert seen["error"]["evalue"] == "" and seen["error"]["traceback"] == "" and seen["error"]["source"] is None
    assert seen["message"] == "failed: ValueError"
    r = mine.get(f"/api/jobs/{run['id']}/output")
    assert r.status_code == 403 and r.json()["error"]["field"] == "job_id", r.text
    theirs = mine.get(f"/api/jobs/{job_id}").json()
    assert theirs["state"] == "done" and theirs["result"] is None and theirs["message"] == "", theirs
    assert admin.get(f"/api/jobs/{job_id}").json()["result"]["cpu_percent"], "its owner's full key sees it"
    text = json.dumps(events) + mine.get("/api/jobs").text + json.dumps(seen) + json.dumps(theirs)
    assert SECRET not in text and "cpu_percent" not in text
    assert events[run["id"]][-1]["state"] == "failed" and events[job_id][-1]["state"] == "done"
    assert all("scopes" not in e and "scope" not in e and "owner_id" not in e for e in sum(events.values(), []))


def test_a_background_job_is_given_the_scope_its_work_needs() -> None:
    """Found by a review: a job made without a scope took plugins:write by default, a rule nobody chose; every
    start gives one now, and a job without one is refused."""
    from bkg_kernel.gateway.jobs import Job

    with pytest.raises(TypeError, match="scope"):
        Job(id="job-1", kind="models.download")  # type: ignore[call-arg]
    assert Job(id="job-2", kind="models.download", scope="models:write").scope == "models:write"


def test_an_owner_without_jobs_run_turns_their_schedule_off_but_never_on_nor_deletes_it(gw: Gateway) -> None:
    """Found by a review: an owner who lost `jobs:run` could not stop their own schedule, which went on firing
    (and failing) for them. Stopping one's own work takes no right to start it: turning off takes the owner's
    plugins:read; turning on takes `jobs:run` (403 naming it, the schedule stays off), and so does deleting (a
    read-only key destroys nothing); another user needs `jobs:run` to turn it off."""
    admin = gw.client()
    dev = _user(gw, "sd-dev", "developer")
    dk = gw.client(_key(gw, dev["id"]))
    body = {"notebook": "loud.ipynb", "cron": "0 3 * * *"}
    s1, s2 = (dk.post("/api/jobs/schedules", json=body).json() for _ in range(2))
    assert s1["enabled"] and s2["enabled"], (s1, s2)
    assert admin.post("/admin/roles", json={"name": "sd-auditor", "scopes": ["admin:audit", "plugins:read"]}).is_success
    aud = gw.client(_key(gw, _user(gw, "sd-aud", "sd-auditor")["id"]))
    r = aud.patch(f"/api/jobs/schedules/{s1['id']}", json={"enabled": False})
    assert r.status_code == 403 and "jobs:run" in r.text, r.text  # not theirs: it takes jobs:run
    assert aud.delete(f"/api/jobs/schedules/{s1['id']}").status_code == 403
    assert admin.patch(f"/admin/users/{dev['id']}", json={"role": "viewer"}).status_code == 200  # jobs:run gone
    r = dk.patch(f"/api/jobs/schedules/{s1['id']}", json={"enabled": False})
    assert r.status_code == 200 and r.json()["enabled"] is False and r.json()["next_run_at"] is None, r.text
    r = dk.patch(f"/api/jobs/schedules/{s1['id']}", json={"enabled": True})
    assert r.status_code == 403 and "jobs:run" in r.text and r.json()["error"]["field"] == "enabled", r.text
    r = dk.delete(f"/api/jobs/schedules/{s2['id']}")
    assert r.status_code == 403 and "jobs:run" in r.text, r.text
    listed = {s["id"]: s for s in dk.get("/api/jobs/schedules").json()["schedules"]}
    assert s2["id"] in listed and listed[s1["id"]]["enabled"] is False, listed
    assert admin.delete(f"/api/jobs/schedules/{s2['id']}").status_code == 204


def test_what_a_run_prints_past_the_limit_is_cut_with_a_marker_saying_how_much(gw: Gateway) -> None:
    """Found by a review: a run kept all it printed, so a notebook printing hundreds of MB filled its worker's
    memory and the data dir. A run keeps the first job_max_output_bytes of what its cells print; the output notebook
    is kept, and each cell that lost some ends with a marker saying how many bytes were cut; rich outputs stay."""
    c = gw.client()
    run = submit(gw, {"notebook": "loud.ipynb", "parameters": {"n": LOUD}})
    done = wait_run(gw, run["id"], timeout=300)
    assert done["state"] == "succeeded", done
    assert os.path.getsize(done["output_path"]) < LIMIT + 128 * 1024  # not the 1.5 MiB it printed
    r = c.get(f"/api/jobs/{run['id']}/output")
    assert r.status_code == 200
    tagged = ("parameters", "injected-parameters")
    cells = [x for x in nbformat.reads(r.text, 4).cells if not set(x.metadata.get("tags", [])) & set(tagged)]
    streams = [[o for o in x.outputs if o.output_type == "stream"] for x in cells]
    kept = "".join(o.text for o in streams[0][:-1])
    assert len(kept.encode()) == LIMIT and set(kept) <= {"x", "\n"}, len(kept)
    limit = f"keeps the first {LIMIT:,} bytes"
    assert "output truncated" in streams[0][-1].text and limit in streams[0][-1].text, streams[0][-1].text
    assert f"{LOUD - LIMIT:,} bytes of stdout were cut" in streams[0][-1].text, streams[0][-1].text
    assert len(streams[1]) == 1 and "the tail of it" not in streams[1][0].text  # the budget is spent: all cut
    assert f"{len('the tail of it') + 1:,} bytes of stdout were cut" in streams[1][0].text, streams[1][0].text
    assert cells[2].outputs[0]["data"]["text/plain"] == "{'rich': 'kept'}"
    c.timeout = httpx.Timeout(180)  # the gateway waits for the HTML of a run just ended (rendered on its worker)
    html = c.get(f"/api/jobs/{run['id']}/output", params={"format": "html"})
    assert html.status_code == 200 and "output truncated" in html.text
    assert len(html.content) < 2 * LIMIT, len(html.content)


def test_a_schedule_made_before_paths_were_kept_is_held_to_the_file_its_name_meant(tmp_path: Path) -> None:
    """Found by a review: a schedule made before migration 0011 kept only its notebook's short name, so once another
    root held a file of that name its fires failed (two roots), and once its file went they ran the other one. At
    start the service resolves such a name once to its full path; one that resolves to no one file stays a name."""
    from bkg_kernel.auth import AuthService, Principal
    from bkg_kernel.jobs.service import JobService
    from bkg_kernel.settings import Settings
    from bkg_kernel.store import Store

    first, second = tmp_path / "first", tmp_path / "second"
    notebook(second / "solo.ipynb", "x = 1", "print('second')")
    first.mkdir()
    store = Store(tmp_path / "data")
    auth = AuthService(store)
    u = auth.create_user("ann", "developer", actor="test")
    ann = Principal(u["id"], "ann", "developer", frozenset(auth.roles["developer"]))
    now = [1_800_000_000.0]
    settings = Settings(job_roots=[first, second], job_workers=1, job_tick_s=60)
    svc = JobService(settings, store, auth, lambda *a: None, "http://127.0.0.1:9", clock=lambda: now[0])
    old = {"notebook": "solo.ipynb", "parameters": {"x": 1}, "cron": "* * * * *", "timezone": "UTC", "enabled": True,
           "owner": "ann", "owner_id": ann.user_id, "scopes": sorted(ann.scopes), "key_id": None, "timeout_s": None,
           "retries": 0, "webhook_url": None, "notify_success": False, "created_at": now[0], "last_fire": now[0],
           "last_run_id": None}  # fmt: skip
    svc.history.save_schedule({**old, "id": "sched-old0011a"})  # as made before 0011: no path
    svc.history.save_schedule({**old, "id": "sched-old0011b", "notebook": "gone.ipynb"})

    async def scenario() -> dict[str, Any]:
        await svc.start(recover=False)
        try:
            notebook(first / "solo.ipynb", "x = 1", "print('first')")  # another root gets a file of that name
            now[0] += 61
            fired = {r["schedule_id"]: r for r in await svc.tick()}
            return {k: dict(svc.live.get(r["id"]) or r) for k, r in fired.items()}
        finally:
            await svc.close()

    try:
        fired = asyncio.run(scenario())
        rows = {s["id"]: s for s in svc.history.schedules()}
    finally:
        auth.close()
        store.close()
    assert rows["sched-old0011a"]["path"] == str((second / "solo.ipynb").resolve()), rows
    assert rows["sched-old0011a"]["notebook"] == "solo.ipynb"  # shown as it was made
    assert rows["sched-old0011b"]["path"] is None  # no file of that name now: it stays a name
    assert fired["sched-old0011a"]["path"] == str((second / "solo.ipynb").resolve()), fired
    assert fired["sched-old0011a"]["state"] in ("queued", "running", "succeeded"), fired
    assert fired["sched-old0011b"]["state"] == "failed", fired


def test_output_a_cell_cleared_no_longer_counts_against_the_limit(gw: Gateway) -> None:
    """Found by a review: the limit counted every byte ever printed, so a loop that clears its output and prints
    its progress (3 MB printed, one 10 KB line kept) spent it, and the run's last print, its result, was cut. What a
    clear removes goes back to the budget, for a clear that waits for the next output and an immediate one alike."""
    run = submit(gw, {"notebook": "progress.ipynb"})
    done = wait_run(gw, run["id"], timeout=300)
    assert done["state"] == "succeeded", done
    text = gw.client().get(f"/api/jobs/{run['id']}/output").text
    assert "output truncated" not in text
    tagged = {"parameters", "injected-parameters"}
    cells = [x for x in nbformat.reads(text, 4).cells if not set(x.metadata.get("tags", [])) & tagged]
    # a print may come as more than one stream message (its newline apart): what each cell shows is their text
    assert {o.output_type for c in cells for o in c.outputs} == {"stream"}
    assert "".join(o.text for o in cells[0].outputs) == f"step 299 {'x' * 10_000}\n"  # the last step, whole
    assert cells[1].outputs == []
    assert "".join(o.text for o in cells[2].outputs) == "final accuracy 0.97\n"
