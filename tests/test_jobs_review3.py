"""Notebook jobs, defects found by a third review (bkg against papermill and jupyter-scheduler), on a real gateway
with real job workers and kernels: a manual retry runs the file its run ran (with its retries), a running run's
output notebook is served as far as it got, a finished run is deleted with its files, and a schedule is read one at
a time, edited, run now, and its runs listed."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbformat
import pytest
from gateway_harness import ADMIN_KEY, Gateway, start_gateway, submit, wait_for, wait_run
from helpers import notebook

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    first, second = (tmp_path_factory.mktemp(n).resolve() for n in ("r3first", "r3second"))
    notebook(first / "twin.ipynb", "n = 1", "print('the first root', n)")
    notebook(first / "mover.ipynb", "n = 1", "print('the file that ran', n)")
    notebook(first / "hello.ipynb", "n = 1", "print('hello', n)")
    notebook(first / "slow.ipynb", "seconds = 120.0", "print('first cell done', flush=True)",
             "import time\ntime.sleep(seconds)")  # fmt: skip
    return first, second


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, roots: tuple[Path, Path]) -> Iterator[Gateway]:
    data = tmp_path_factory.mktemp("jobs_review3") / "data"
    g = start_gateway(data, env={"BKG_JOB_ROOTS": os.pathsep.join(map(str, roots))}, plugins=["sysinfo"])
    yield g
    g.stop()


def _person(gw: Gateway, name: str, scopes: list[str]) -> tuple[str, dict[str, Any]]:
    """A new user `name` whose role has exactly `scopes`: their id and a key of theirs (its record: `key`, `id`)."""
    admin = gw.client()
    assert admin.post("/admin/roles", json={"name": f"{name}-role", "scopes": scopes}).status_code == 201
    user = admin.post("/admin/users", json={"username": name, "role": f"{name}-role"}).json()
    return str(user["id"]), _key(gw, user["id"])


def _key(gw: Gateway, user_id: str | None, **body: Any) -> dict[str, Any]:
    """A new key of user `user_id` (None: the admin's own), with `body`'s fields (`scopes`)."""
    r = gw.client().post("/admin/keys", json={"name": "k", **({"user_id": user_id} if user_id else {}), **body})
    assert r.status_code == 201, r.text
    return dict(r.json())


def _printed(gw: Gateway, run_id: str, key: str = ADMIN_KEY) -> str:
    """What a run's cells printed, from its output notebook as the gateway serves it."""
    r = gw.client(key).get(f"/api/jobs/{run_id}/output")
    assert r.status_code == 200, r.text
    return "".join(o.get("text", "") for c in nbformat.reads(r.text, 4).cells for o in c.get("outputs", []))


def _cli(gw: Gateway, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BKG_GATEWAY_URL": gw.url, "BKG_API_KEY": ADMIN_KEY}
    return subprocess.run([sys.executable, "-m", "bkg_kernel.cli", "jobs", *args], capture_output=True, text=True,
                          env=env, timeout=180)  # fmt: skip


def test_a_retry_runs_the_file_its_run_ran_with_its_retries(gw: Gateway, roots: tuple[Path, Path]) -> None:
    """Found by a review: POST /api/jobs/{id}/retry looked the notebook up again by its short name, so once another
    root held a file of that name the retry was a 409, and once the file moved it ran another file; and it reset the
    run's retries to 0. A retry runs the file its run ran (409 naming it when that file is gone), with its retries."""
    first, second = roots
    c = gw.client()
    run = submit(gw, {"notebook": "twin.ipynb", "retries": 2})
    done = wait_run(gw, run["id"])
    assert done["state"] == "succeeded" and "the first root" in _printed(gw, run["id"]), done
    notebook(second / "twin.ipynb", "n = 1", "print('the second root', n)")  # the name now in two roots
    r = c.post(f"/api/jobs/{run['id']}/retry")
    assert r.status_code == 202, r.text
    again = r.json()
    assert again["retry_of"] == run["id"] and again["retries"] == 2 and again["attempt"] == 1, again
    redone = wait_run(gw, again["id"])
    assert redone["state"] == "succeeded" and redone["notebook"] == str(first / "twin.ipynb"), redone
    assert "the first root" in _printed(gw, again["id"]) and "the second root" not in _printed(gw, again["id"])

    moved = wait_run(gw, submit(gw, {"notebook": "mover.ipynb"})["id"])
    assert moved["state"] == "succeeded", moved
    (first / "mover.ipynb").rename(second / "mover.ipynb")  # moved: its name now leads to another root's file
    r = c.post(f"/api/jobs/{moved['id']}/retry")
    assert r.status_code == 409 and r.json()["error"]["field"] == "job_id", r.text
    assert str(first / "mover.ipynb") in r.json()["error"]["message"], r.text
    assert not [j for j in c.get("/api/jobs").json()["jobs"] if j.get("retry_of") == moved["id"]]


def test_a_running_runs_output_notebook_is_served_as_far_as_it_got(gw: Gateway) -> None:
    """Found by a review: GET /api/jobs/{id}/output was a 404 until a run ended, though papermill saves its output
    notebook as each cell starts and ends. While it runs its notebook so far is served (ipynb; its HTML comes at the
    end: 409 saying so), under the rule of a finished run's output, and `wb.jobs.output` reads it."""
    from bkg_kernel.client import Workbench

    admin = gw.client()
    narrow = _key(gw, None, scopes=["plugins:read"])["key"]  # the admin's own key, narrowed
    run = submit(gw, {"notebook": "slow.ipynb"})

    def printed(r: Any) -> bool:  # in an output: the cell's source says it too, and is saved before it runs
        cells = nbformat.reads(r.text, 4).cells
        return any("first cell done" in o.get("text", "") for c in cells for o in c.get("outputs", []))

    def so_far() -> Any:
        r = admin.get(f"/api/jobs/{run['id']}/output")
        return r if r.status_code == 200 and printed(r) else None

    r = wait_for(so_far, timeout=120, every=0.3)
    assert r.headers["content-type"].startswith("application/x-ipynb+json"), r.headers
    text = Workbench(gw.url, ADMIN_KEY).jobs.output(run["id"])
    assert "first cell done" in text and nbformat.reads(text, 4).cells
    html = admin.get(f"/api/jobs/{run['id']}/output", params={"format": "html"})
    assert html.status_code == 409 and html.json()["error"]["field"] == "format", html.text
    refused = gw.client(narrow).get(f"/api/jobs/{run['id']}/output")
    assert refused.status_code == 403 and refused.json()["error"]["field"] == "job_id", refused.text
    still = admin.get(f"/api/jobs/{run['id']}").json()
    assert still["state"] == "running" and still["finished_at"] is None, still  # all of the above while it ran
    assert admin.post(f"/api/jobs/{run['id']}/cancel").status_code == 200
    assert wait_run(gw, run["id"], timeout=60)["state"] == "cancelled"
    assert "first cell done" in _printed(gw, run["id"])


def test_a_finished_run_is_deleted_with_its_files_by_who_may(gw: Gateway) -> None:
    """Found by a review: a run could not be deleted (DELETE /api/jobs/{id} was a 405). A finished run goes with its
    output notebook and HTML: its owner's with `jobs:run`, someone else's with `jobs:run` and admin:audit; a run
    still going is a 409 (cancel it first); who cannot see it gets 404, who sees it without the right 403."""
    from bkg_kernel.client import Workbench

    admin = gw.client()
    dev_id, dev = _person(gw, "r3-del-dev", ["plugins:read", "jobs:run"])
    _, other = _person(gw, "r3-del-other", ["plugins:read", "jobs:run"])
    _, aud = _person(gw, "r3-del-aud", ["plugins:read", "admin:audit"])
    narrow = _key(gw, dev_id, scopes=["plugins:read"])["key"]
    dk = gw.client(dev["key"])
    run = submit(gw, {"notebook": "hello.ipynb"}, key=dev["key"])
    assert wait_run(gw, run["id"], key=dev["key"])["state"] == "succeeded"
    done = wait_for(lambda: (r := dk.get(f"/api/jobs/{run['id']}").json())["html_path"] and r, timeout=120)
    runs = gw.data_dir / "runs"
    left = [Path(done["output_path"]), Path(done["html_path"])]
    assert all(f.is_file() and f.parent == runs for f in left), left

    r = gw.client(other["key"]).delete(f"/api/jobs/{run['id']}")
    assert r.status_code == 404 and r.json()["error"]["field"] == "job_id", r.text
    r = gw.client(aud["key"]).delete(f"/api/jobs/{run['id']}")
    assert r.status_code == 403 and "jobs:run" in r.text, r.text
    r = gw.client(narrow).delete(f"/api/jobs/{run['id']}")
    assert r.status_code == 403 and "jobs:run" in r.text, r.text
    assert dk.get(f"/api/jobs/{run['id']}").status_code == 200 and all(f.is_file() for f in left)

    going = submit(gw, {"notebook": "slow.ipynb"}, key=dev["key"])
    r = dk.delete(f"/api/jobs/{going['id']}")
    assert r.status_code == 409 and "cancel it first" in r.text and r.json()["error"]["field"] == "job_id", r.text
    assert dk.post(f"/api/jobs/{going['id']}/cancel").status_code == 200
    assert wait_run(gw, going["id"], key=dev["key"], timeout=60)["state"] == "cancelled"

    r = dk.delete(f"/api/jobs/{run['id']}")
    assert r.status_code == 204, r.text
    assert dk.get(f"/api/jobs/{run['id']}").status_code == 404
    assert not any(f.exists() for f in left) and not list(runs.glob(f"{run['id']}*"))
    assert run["id"] not in [j["id"] for j in admin.get("/api/jobs").json()["jobs"]]
    assert dk.delete(f"/api/jobs/{run['id']}").status_code == 404

    Workbench(gw.url, ADMIN_KEY).jobs.delete(going["id"])  # an admin deletes another's run (admin:audit, jobs:run)
    assert dk.get(f"/api/jobs/{going['id']}").status_code == 404 and not list(runs.glob(f"{going['id']}*"))
    mine = wait_run(gw, submit(gw, {"notebook": "hello.ipynb"})["id"])
    out = _cli(gw, "delete", mine["id"])
    assert out.returncode == 0 and f"deleted {mine['id']}" in out.stdout, (out.stdout, out.stderr)
    assert admin.get(f"/api/jobs/{mine['id']}").status_code == 404


def test_a_schedule_is_read_edited_run_now_and_its_runs_listed(gw: Gateway) -> None:
    """Found by a review: a schedule could only be turned on and off. One schedule is read as the listing shows it;
    PATCH changes its cron, timezone, parameters, timeout_s and retries, checked as on create (422 naming the field),
    by who could make it and holds its scopes; POST .../run runs it now as its fire would (its owner, the key it lives
    by: 403 once that is revoked); GET /api/jobs?schedule_id= lists its runs."""
    from bkg_kernel.client import Workbench

    admin = gw.client()
    dev_id, dev = _person(gw, "r3-sched-dev", ["plugins:read", "jobs:run", "collections:read"])
    _, other = _person(gw, "r3-sched-other", ["plugins:read", "jobs:run", "collections:read"])
    _, aud = _person(gw, "r3-sched-aud", ["plugins:read", "admin:audit"])
    narrow = _key(gw, dev_id, scopes=["plugins:read", "jobs:run"])["key"]  # without collections:read
    dk, wb = gw.client(dev["key"]), Workbench(gw.url, dev["key"])
    made = dk.post("/api/jobs/schedules", json={"notebook": "hello.ipynb", "cron": "0 3 * * *", "parameters": {"n": 2}})
    assert made.status_code == 201, made.text
    sid = made.json()["id"]
    one = dk.get(f"/api/jobs/schedules/{sid}")
    assert one.status_code == 200, one.text
    listed = {s["id"]: s for s in dk.get("/api/jobs/schedules").json()["schedules"]}
    assert one.json() == listed[sid] == wb.jobs.get_schedule(sid), (one.json(), listed[sid])
    assert gw.client(aud["key"]).get(f"/api/jobs/schedules/{sid}").status_code == 200  # an auditor sees it
    oc = gw.client(other["key"])
    assert oc.get(f"/api/jobs/schedules/{sid}").status_code == 404
    assert oc.patch(f"/api/jobs/schedules/{sid}", json={"retries": 1}).status_code == 404
    assert oc.post(f"/api/jobs/schedules/{sid}/run").status_code == 404

    bad = [({"cron": "61 * * * *"}, "cron"), ({"cron": "0 3 * *"}, "cron"), ({"cron": "0 0 30 2 *"}, "cron"),
           ({"cron": None}, "cron"), ({"timezone": "Mars/Olympus"}, "timezone"), ({"parameters": {"n": "x"}},
           "parameters.n"), ({"parameters": {"nope": 1}}, "parameters.nope"), ({"retries": 11}, "retries"),
           ({"timeout_s": -1}, "timeout_s"), ({"notebook": "twin.ipynb"}, "notebook")]  # fmt: skip
    for body, field in bad:
        r = dk.patch(f"/api/jobs/schedules/{sid}", json=body)
        assert r.status_code == 422 and r.json()["error"]["field"] == field, (body, r.text)
    assert dk.get(f"/api/jobs/schedules/{sid}").json() == one.json()  # nothing changed

    for key, missing in ((aud["key"], "jobs:run"), (narrow, "collections:read")):
        r = gw.client(key).patch(f"/api/jobs/schedules/{sid}", json={"parameters": {"n": 3}})
        assert r.status_code == 403 and missing in r.text and r.json()["error"]["field"] == "parameters", r.text
        r = gw.client(key).post(f"/api/jobs/schedules/{sid}/run")  # the route's own scope (jobs:run) names no field
        assert r.status_code == 403 and missing in r.text, r.text
        assert r.json()["error"].get("field") == (None if missing == "jobs:run" else "schedule_id"), r.text
    change = {"cron": "30 4 * * 1", "timezone": "Europe/Paris", "parameters": {"n": 5}, "timeout_s": 600, "retries": 1}
    r = dk.patch(f"/api/jobs/schedules/{sid}", json=change)
    assert r.status_code == 200, r.text
    edited = r.json()
    assert {k: edited[k] for k in change} == change and edited["enabled"] is True, edited
    assert edited["next_run_at"] != one.json()["next_run_at"] and dk.get(f"/api/jobs/schedules/{sid}").json() == edited

    unrelated = submit(gw, {"notebook": "hello.ipynb"}, key=dev["key"])
    r = dk.post(f"/api/jobs/schedules/{sid}/run")
    assert r.status_code == 202, r.text
    now = r.json()
    assert now["schedule_id"] == sid and now["owner"] == "r3-sched-dev" and now["parameters"] == {"n": 5}, now
    assert now["retries"] == 1 and now["timeout_s"] == 600, now
    assert wait_run(gw, now["id"], key=dev["key"])["state"] == "succeeded"
    assert "hello 5" in _printed(gw, now["id"], dev["key"])
    second = wb.jobs.run_schedule(sid)
    assert second["schedule_id"] == sid and wait_run(gw, second["id"], key=dev["key"])["state"] == "succeeded"
    wait_run(gw, unrelated["id"], key=dev["key"])
    ids = [j["id"] for j in dk.get("/api/jobs", params={"schedule_id": sid}).json()["jobs"]]
    assert ids == [second["id"], now["id"]], ids
    assert [r["id"] for r in wb.jobs.list(schedule_id=sid)] == ids
    assert [j["id"] for j in admin.get("/api/jobs", params={"schedule_id": sid}).json()["jobs"]] == ids
    assert dk.get(f"/api/jobs/schedules/{sid}").json()["last_run_id"] == second["id"]

    off = wb.jobs.update_schedule(sid, enabled=False)
    assert off["enabled"] is False and off["next_run_at"] is None, off
    assert admin.post(f"/admin/keys/{dev['id']}/revoke").is_success  # the key it lives by
    r = admin.post(f"/api/jobs/schedules/{sid}/run")  # as a fire: its owner's revoked key runs nothing
    assert r.status_code == 403 and r.json()["error"]["field"] == "key_id", r.text
    assert [j["id"] for j in admin.get("/api/jobs", params={"schedule_id": sid}).json()["jobs"]] == ids
