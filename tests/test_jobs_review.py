"""Notebook jobs, defects found by a review, against a real gateway with real job workers and kernels (and the job
service in this process on a real store, with a clock the test moves, where a schedule or a restart is the point):
a name two job roots hold, retries followed to the last attempt, random crons, the data dir as a file root,
optional parameters, the CLI's typed values, paging the history, the notebook's kernel, an interrupted run's
duration, a cancel's answer and a disabled schedule's next run."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbformat
import pytest
from gateway_harness import ADMIN_KEY, Gateway, start_gateway, submit, wait_for, wait_run
from helpers import notebook

from bkg_kernel.errors import Forbidden
from bkg_kernel.jobs import files, notebooks, schedule

pytestmark = pytest.mark.slow
OLD_RUNS = 450  # kept before the gateway started: more than one page of 200


def printed(done: dict[str, Any]) -> str:
    """What the run's cells printed."""
    cells = nbformat.read(done["output_path"], 4).cells
    return "".join(o.get("text", "") for c in cells for o in c.get("outputs", []))


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    first, second = (tmp_path_factory.mktemp(n).resolve() for n in ("first", "second"))
    notebook(first / "hello.ipynb", "n = 1", "print('the first root', n)")
    notebook(second / "hello.ipynb", "n = 1", "print('the second root', n)")
    notebook(first / "flaky.ipynb", "marker = ''",
             "import pathlib\np = pathlib.Path(marker)\nif not p.exists():\n"
             "    p.write_text('1')\n    raise RuntimeError('first attempt fails')")  # fmt: skip
    notebook(first / "opt.ipynb", "from typing import Optional\nlabel: Optional[str] = None\n"
             "tag: str | None = None  # a tag\ncount: int | None = None",
             "import json\nprint(json.dumps([label, tag, count]))")  # fmt: skip
    notebook(first / "typed.ipynb", "n = 1\nname = 'x'", "print('typed', n * 2, repr(name))")
    notebook(first / "sleepy.ipynb", "seconds = 60.0", "import time", "time.sleep(seconds)")
    plain = notebook(first / "no_kernelspec.ipynb", "n = 1", "print('ran in', __import__('sys').executable, n)")
    nb = nbformat.read(plain, 4)
    del nb.metadata["kernelspec"]
    nbformat.write(nb, plain)
    other = notebook(first / "r_kernel.ipynb", "n <- 1", "print(n)")
    nb = nbformat.read(other, 4)
    nb.metadata["kernelspec"] = {"name": "ir", "display_name": "R", "language": "R"}
    nbformat.write(nb, other)
    return first, second


def keep_old_runs(data: Path) -> None:
    """Runs of an earlier gateway in the store's database (three made at each instant: paging must not lose one)."""
    from bkg_kernel.jobs.history import History
    from bkg_kernel.store import Store

    with Store(data) as store:
        h = History(store)
        base = time.time() - 86400
        for i in range(OLD_RUNS):
            h.save_run({"id": f"run-old{i:04d}", "notebook": "old.ipynb", "parameters": {}, "state": "succeeded",
                        "owner": "old", "owner_id": "u-old", "scopes": [], "created_at": base + i // 3,
                        "finished_at": base + i // 3 + 1})  # fmt: skip


@pytest.fixture(scope="module")
def jgw(tmp_path_factory: pytest.TempPathFactory, roots: tuple[Path, Path]) -> Iterator[Gateway]:
    data = tmp_path_factory.mktemp("jobs_review") / "data"
    keep_old_runs(data)
    g = start_gateway(data, env={"BKG_JOB_ROOTS": os.pathsep.join(map(str, roots))}, plugins=["sysinfo"])
    yield g
    g.stop()


def cli(gw: Gateway, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BKG_GATEWAY_URL": gw.url, "BKG_API_KEY": ADMIN_KEY}
    return subprocess.run([sys.executable, "-m", "bkg_kernel.cli", "jobs", *args], capture_output=True, text=True,
                          env=env, timeout=180)  # fmt: skip


def service(tmp_path: Path, roots: list[Path], **settings: Any) -> tuple[Any, Any, Any, Any, list[float]]:
    """A job service in this process on a real store, with a clock the test moves, and a developer."""
    from bkg_kernel.auth import AuthService, Principal
    from bkg_kernel.jobs.service import JobService
    from bkg_kernel.settings import Settings
    from bkg_kernel.store import Store

    store = Store(tmp_path / "data")
    auth = AuthService(store)
    u = auth.create_user("ann", "developer", actor="test")
    ann = Principal(u["id"], "ann", "developer", frozenset(auth.roles["developer"]))
    now = [1_800_000_000.0]
    svc = JobService(Settings(job_roots=roots, **settings), store, auth, lambda *a: None, "http://127.0.0.1:9",
                     clock=lambda: now[0])  # fmt: skip
    return svc, store, auth, ann, now


def test_a_name_two_roots_hold_is_refused_and_a_full_path_always_runs_that_file(
    jgw: Gateway, roots: tuple[Path, Path]
) -> None:
    """Found by a review: `hello.ipynb` in two roots ran the first root's, and a run of the second one named by its
    full path was kept as `hello.ipynb`: its retry ran the first root's notebook. Now the bare name is a 409 that
    lists both, and a run (and its retry) keeps the full path and runs that file."""
    first, second = roots
    c = jgw.client()
    r = c.post("/api/jobs", json={"notebook": "hello.ipynb"})
    assert r.status_code == 409 and r.json()["error"]["field"] == "notebook", r.text
    said = r.json()["error"]["message"]
    assert str(first / "hello.ipynb") in said and str(second / "hello.ipynb") in said and "full path" in said
    theirs = str(second / "hello.ipynb")
    run = submit(jgw, {"notebook": theirs})
    assert run["notebook"] == theirs
    done = wait_run(jgw, run["id"])
    assert done["state"] == "succeeded" and "the second root" in printed(done), done
    again = c.post(f"/api/jobs/{run['id']}/retry")
    assert again.status_code == 202, again.text
    done = wait_run(jgw, again.json()["id"])
    assert done["notebook"] == theirs and "the second root" in printed(done), printed(done)
    listed = [n["notebook"] for n in c.get("/api/jobs/notebooks").json()["notebooks"]]
    assert theirs in listed and str(first / "hello.ipynb") in listed and "hello.ipynb" not in listed
    assert "typed.ipynb" in listed  # a name one root holds stays short


def test_a_schedule_fires_the_file_it_was_made_for(tmp_path: Path, roots: tuple[Path, Path]) -> None:
    first, second = roots
    svc, store, auth, ann, now = service(tmp_path, [first, second])

    async def scenario() -> dict[str, Any]:
        svc.queue = asyncio.Queue()  # what start() makes; no dispatcher takes from it: the run stays queued
        s = await svc.add_schedule(ann, {"notebook": str(second / "hello.ipynb"), "cron": "* * * * *"})
        assert s["notebook"] == str(second / "hello.ipynb")
        now[0] += 61
        fired = await svc.tick()
        assert [r["schedule_id"] for r in fired] == [s["id"]]
        return dict(svc.live[fired[0]["id"]])

    try:
        run = asyncio.run(scenario())
    finally:
        auth.close()
        store.close()
    assert run["path"] == str(second / "hello.ipynb"), run


def test_a_schedule_keeps_to_its_file_when_another_root_gets_one_of_that_name(tmp_path: Path) -> None:
    """Found by a review: a schedule kept the notebook's short name, so once another root held a file of that
    name a fire was a 409 (two roots), and once the first file was deleted it ran the other root's file."""
    first, second = tmp_path / "first", tmp_path / "second"
    notebook(second / "solo.ipynb", "x = 1", "print('second')")
    first.mkdir()
    svc, store, auth, ann, now = service(tmp_path, [first, second], job_overlap="queue")  # the first run stays queued

    async def scenario() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        svc.queue = asyncio.Queue()  # no dispatcher: a fired run stays queued
        s = await svc.add_schedule(ann, {"notebook": "solo.ipynb", "cron": "* * * * *"})
        assert s["notebook"] == "solo.ipynb" and "path" not in s  # shown short, as it was made
        notebook(first / "solo.ipynb", "x = 1", "print('first')")  # another root gets a file of that name
        now[0] += 61
        (kept,) = await svc.tick()
        (second / "solo.ipynb").unlink()
        now[0] += 60
        (gone,) = await svc.tick()
        return s, dict(svc.live[kept["id"]]), gone

    try:
        s, kept, gone = asyncio.run(scenario())
    finally:
        auth.close()
        store.close()
    assert kept["path"] == str(second / "solo.ipynb") and kept["schedule_id"] == s["id"], kept
    assert gone["state"] == "failed" and str(second / "solo.ipynb") in gone["error"]["evalue"], gone


def test_retries_are_followed_to_the_last_attempt(jgw: Gateway, tmp_path: Path) -> None:
    """Found by a review: `retried_by` was never saved, so `wb.jobs.run(retries=1)` and `bkg jobs run --retries 1`
    reported the failed first attempt (exit 1) while the retry succeeded."""
    from bkg_kernel.client import Workbench

    wb = Workbench(jgw.url, ADMIN_KEY)
    run = wb.jobs.run("flaky.ipynb", marker=str(tmp_path / "api"), retries=1, progress=False)
    assert run.ok and run["attempt"] == 2 and run["retry_of"], run
    first = wb.jobs.get(run["retry_of"])
    assert first["state"] == "failed" and first["retried_by"] == run["id"]
    r = cli(jgw, "run", "flaky.ipynb", "-p", "marker", str(tmp_path / "cli"), "--retries", "1")
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert "succeeded" in r.stdout.splitlines()[-1], r.stdout


def test_random_and_hashed_crons_are_refused(jgw: Gateway) -> None:
    """Found by a review: `R * * * *` was taken, and croniter drew its minute again at every tick, so it fired many
    times an hour. R and H are refused, 422 naming `cron`; names that hold those letters (THU, MAR) are not."""
    from bkg_kernel.errors import InvalidInput

    for cron in ("R * * * *", "H * * * *", "0 R * * *", "H/5 * * * *", "1,r * * * *", "R(0-29) * * * *"):
        with pytest.raises(InvalidInput) as exc:
            schedule.check(cron, "UTC")
        assert exc.value.field == "cron" and "R or H" in exc.value.message, cron
        with pytest.raises(ValueError):  # a row stored before: never due
            schedule.due(cron, "UTC", 1_800_000_000.0, 1_800_003_600.0)
    c = jgw.client()
    for cron in ("R * * * *", "H/5 * * * *", "0 r * * *"):
        r = c.post("/api/jobs/schedules", json={"notebook": "typed.ipynb", "cron": cron})
        assert r.status_code == 422 and r.json()["error"]["field"] == "cron", r.text
        assert "R or H" in r.json()["error"]["message"], r.text
    for cron in ("0 3 * * THU", "0 3 1 MAR *", "0 3 * * sun"):
        schedule.check(cron, "UTC")
        made = c.post("/api/jobs/schedules", json={"notebook": "typed.ipynb", "cron": cron, "enabled": False})
        assert made.status_code == 201, made.text
        assert c.delete(f"/api/jobs/schedules/{made.json()['id']}").status_code == 204


def test_the_data_dir_as_a_file_root_never_opens_its_own_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by a review: `job_file_roots` set to the data dir let a job read admin.key and workbench.key; the README
    says the data dir's own files are never read whatever is set."""
    data = tmp_path / "data"
    for name in ("admin.key", "workbench.key", "bkg.duckdb", "runs/run-1.ipynb", "files/docs/a.txt", "photos/p.txt"):
        (data / name).parent.mkdir(parents=True, exist_ok=True)
        (data / name).write_text(name)
    monkeypatch.setenv("BKG_DATA_DIR", str(data))
    for allowed in ([data], [tmp_path]):  # the data dir itself, a folder holding it
        monkeypatch.setenv(files.ROOTS_ENV, os.pathsep.join(map(str, allowed)))
        root = files.readable_folder(str(data))
        found = [p.relative_to(data).as_posix() for p in files.readable_files(root, ["*", "**/*"])]
        assert found == ["files/docs/a.txt"], (allowed, found)
    monkeypatch.setenv(files.ROOTS_ENV, str(data / "photos"))  # a folder of it named as a root is opened
    assert [p.name for p in files.readable_files(data / "photos", ["*"])] == ["p.txt"]


def test_the_listing_leaves_out_links_that_lead_out_of_the_roots_or_to_nothing(tmp_path: Path) -> None:
    """Found by a review: a link to a notebook outside the roots was listed, with the parameters read from that
    file, and then refused when run."""
    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere"
    notebook(root / "own.ipynb", "n = 1")
    notebook(elsewhere / "secret.ipynb", "token = 'outside'")
    (root / "out.ipynb").symlink_to(elsewhere / "secret.ipynb")
    (root / "gone.ipynb").symlink_to(tmp_path / "missing.ipynb")
    (root / "alias.ipynb").symlink_to(root / "own.ipynb")  # a link inside the roots runs, so it is listed
    found = {e["notebook"]: e["parameters"] for e in notebooks.listing([root])}
    assert sorted(found) == ["alias.ipynb", "own.ipynb"] and "token" not in str(found)
    with pytest.raises(Forbidden):
        notebooks.resolve("out.ipynb", [root])


def test_optional_parameters_are_known_and_read_as_their_inner_type(jgw: Gateway, roots: tuple[Path, Path]) -> None:
    """Found by a review: papermill skips an annotation with `|`, so `tag: str | None = None` was an unknown
    parameter (422), and `-p label 123` for `label: Optional[str]` was read as JSON (the int 123, then a 422)."""
    found = notebooks.parameters(roots[0] / "opt.ipynb")
    assert {n: p["type"] for n, p in found.items()} == {"label": "Optional[str]", "tag": "str | None",
                                                         "count": "int | None"}  # fmt: skip
    assert found["tag"]["help"] == "a tag" and found["count"]["default"] == "None"
    assert notebooks.coerce("123", "Optional[str]") == "123" and notebooks.coerce("5", "int | None") == 5
    assert notebooks.coerce("None", "str | None") is None and notebooks.coerce("None", "str") == "None"
    done = wait_run(jgw, submit(jgw, {"notebook": "opt.ipynb", "parameters": {"tag": "t", "count": 3}})["id"])
    assert done["state"] == "succeeded" and json.loads(printed(done)) == [None, "t", 3], done
    r = jgw.client().post("/api/jobs", json={"notebook": "opt.ipynb", "parameters": {"count": "three"}})
    assert r.status_code == 422 and r.json()["error"]["field"] == "parameters.count", r.text


def test_the_cli_reads_values_as_declared_however_the_notebook_is_named(jgw: Gateway, roots: tuple[Path, Path]) -> None:
    """Found by a review: the CLI looked the types up by the name as typed, so `./typed.ipynb` or a full path sent
    `-p name 7` as the int 7 (a 422), and an Optional[str] read `123` as an int."""
    by_dot = cli(jgw, "run", "./typed.ipynb", "-p", "n", "4", "-p", "name", "7", "--detach")
    by_path = cli(jgw, "run", str(roots[0] / "opt.ipynb"), "-p", "label", "123", "-p", "count", "4", "--detach")
    assert by_dot.returncode == 0 and by_path.returncode == 0, (by_dot.stderr, by_path.stderr)
    typed = wait_run(jgw, by_dot.stdout.split()[0])
    assert typed["state"] == "succeeded" and "typed 8 '7'" in printed(typed), typed
    opt = wait_run(jgw, by_path.stdout.split()[0])
    assert opt["state"] == "succeeded" and json.loads(printed(opt)) == ["123", None, 4], opt
    missing = cli(jgw, "run", "./nope.ipynb", "-p", "n", "1")  # refused as the run would be
    assert missing.returncode != 0 and "nope.ipynb" in missing.stderr + missing.stdout


def test_the_history_pages_past_two_hundred_runs(jgw: Gateway) -> None:
    """Found by a review: GET /api/jobs took no limit (`?limit=1000` a 422) and answered 200 runs at most, so
    `bkg jobs list --limit 1000` and `wb.jobs.list(1000)` showed 200. It takes `limit` and the cursor `before`."""
    from bkg_kernel.client import Workbench

    c = jgw.client()
    everything = c.get("/api/jobs", params={"limit": 1000}).json()
    ids = [j["id"] for j in everything["jobs"]]
    assert len(ids) >= OLD_RUNS and len(set(ids)) == len(ids) and everything["next_before"] is None
    paged, before = [], None
    while True:  # pages of 100 through runs made three at a time: none lost, none twice
        page = c.get("/api/jobs", params={"limit": 100} | ({"before": before} if before else {})).json()
        assert len(page["jobs"]) <= 100
        paged += [j["id"] for j in page["jobs"]]
        before = page["next_before"]
        if before is None:
            break
    assert paged == ids
    assert len(c.get("/api/jobs").json()["jobs"]) == 200  # the default page
    for params, field in (
        ({"limit": 0}, "query.limit"),
        ({"limit": 10_001}, "query.limit"),
        ({"before": "run-x"}, "query.before"),
    ):
        r = c.get("/api/jobs", params=params)
        assert r.status_code in (404, 422) and r.json()["error"]["field"] == field, r.text
    runs = [j["id"] for j in everything["jobs"] if j.get("kind") == "notebook"]
    listed = Workbench(jgw.url, ADMIN_KEY).jobs.list(1000)
    assert [r["id"] for r in listed] == runs
    assert [r["id"] for r in Workbench(jgw.url, ADMIN_KEY).jobs.list(5, before=runs[100])] == runs[101:106]
    shown = cli(jgw, "list", "--limit", "1000")
    assert shown.returncode == 0 and len(shown.stdout.splitlines()) == len(runs), shown.stderr


def test_the_notebook_s_kernel_python3_when_it_names_none_refused_when_not_python(jgw: Gateway) -> None:
    """Found by a review: a notebook with no kernelspec failed ("No kernel name found in notebook"), one declaring
    R's kernel ran in Python anyway. Now the first runs in python3, as `papermill -k python3`; the second is a 422."""
    done = wait_run(jgw, submit(jgw, {"notebook": "no_kernelspec.ipynb", "parameters": {"n": 2}})["id"])
    assert done["state"] == "succeeded" and "ran in" in printed(done), done
    r = jgw.client().post("/api/jobs", json={"notebook": "r_kernel.ipynb"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "notebook", r.text
    assert "'ir'" in r.json()["error"]["message"] and "Python" in r.json()["error"]["message"]


def test_a_cancel_answers_with_the_run_ended_or_cancelling(jgw: Gateway) -> None:
    """Found by a review: the answer to a cancel showed the run `running`."""
    c = jgw.client()
    run = submit(jgw, {"notebook": "sleepy.ipynb"})
    wait_for(lambda: c.get(f"/api/jobs/{run['id']}").json()["cells_done"] >= 2, 60)
    r = c.post(f"/api/jobs/{run['id']}/cancel")
    assert r.status_code == 200
    said = r.json()
    assert said["state"] == "cancelled" or (said["finished_at"] is None and said["message"] == "cancelling"), said
    assert wait_run(jgw, run["id"], timeout=30)["state"] == "cancelled"


def test_cancelling_a_run_needs_jobs_run_even_for_its_owner(jgw: Gateway) -> None:
    """Found by a review: a key its owner narrowed to plugins:read could cancel the owner's runs."""
    c = jgw.client()
    narrow = c.post("/admin/keys", json={"name": "reader-only", "scopes": ["plugins:read"]}).json()["key"]
    run = submit(jgw, {"notebook": "sleepy.ipynb"})
    wait_for(lambda: c.get(f"/api/jobs/{run['id']}").json()["cells_done"] >= 2, 120)  # its kernel runs it
    r = jgw.client(narrow).post(f"/api/jobs/{run['id']}/cancel")
    assert r.status_code == 403 and "jobs:run" in r.json()["error"]["message"], r.text
    assert c.get(f"/api/jobs/{run['id']}").json()["state"] == "running"  # still going
    assert c.post(f"/api/jobs/{run['id']}/cancel").status_code == 200
    assert wait_run(jgw, run["id"], timeout=60)["state"] == "cancelled"


def test_a_disabled_schedule_has_no_next_run(jgw: Gateway) -> None:
    c = jgw.client()
    s = c.post("/api/jobs/schedules", json={"notebook": "typed.ipynb", "cron": "0 3 * * *", "enabled": False}).json()
    assert s["enabled"] is False and s["next_run_at"] is None, s
    assert c.patch(f"/api/jobs/schedules/{s['id']}", json={"enabled": True}).json()["next_run_at"] > time.time()
    assert c.patch(f"/api/jobs/schedules/{s['id']}", json={"enabled": False}).json()["next_run_at"] is None
    assert [x["next_run_at"] for x in c.get("/api/jobs/schedules").json()["schedules"] if x["id"] == s["id"]] == [None]
    c.delete(f"/api/jobs/schedules/{s['id']}")


def test_an_interrupted_run_ends_when_it_was_last_seen_alive(tmp_path: Path, roots: tuple[Path, Path]) -> None:
    """Found by a review: a run the gateway's stop interrupted ended when the gateway started again, so its duration
    held all the time the gateway was down. The service notes at each tick that its runs are alive (on its clock);
    the next start ends them there."""
    from bkg_kernel.jobs.service import JobService, public

    svc, store, auth, ann, now = service(tmp_path, [roots[0]], job_workers=1, job_tick_s=0.05)

    async def running() -> str:
        await svc.start(recover=False)
        try:
            run = await svc.submit(ann, "sleepy.ipynb")
            for _ in range(1200):
                if svc.live[run["id"]]["state"] == "running":
                    break
                await asyncio.sleep(0.1)
            assert svc.live[run["id"]]["started_at"] == now[0]
            for _ in range(100):  # its start is written on a thread
                if (await asyncio.to_thread(svc.history.run, run["id"]))["state"] == "running":
                    break
                await asyncio.sleep(0.05)
            now[0] += 42  # it runs 42 s on the service's clock
            for _ in range(100):
                if svc._last_beat() == now[0]:  # a tick noted it alive then
                    break
                await asyncio.sleep(0.05)
            assert svc._last_beat() == now[0]
            return str(run["id"])
        finally:
            await svc.close()  # the gateway stops: its run is marked at the next start

    async def restarted() -> None:
        again = JobService(svc.settings, store, auth, lambda *a: None, "http://127.0.0.1:9", clock=lambda: now[0])
        await again.start()
        await again.close()

    try:
        run_id = asyncio.run(running())
        now[0] += 3600  # an hour down
        asyncio.run(restarted())
        row = svc.history.run(run_id)
    finally:
        auth.close()
        store.close()
    assert row["state"] == "failed" and "interrupted" in row["message"], row
    assert public(row)["duration_s"] == 42.0, row
