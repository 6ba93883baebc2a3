"""Notebook jobs: per-run overhead and 20-run throughput, bkg vs papermill (CLI and in-process) and bkg on Dask,
in one run.

    python bench/jobs.py [--repeat 5] [--burst 20] [--workers 2]

The notebook is trivial: a cell tagged `parameters` (`n = 1`) and one cell `x = n * 2`, so what is measured is
what each way of running it costs around the code.

Per run (`--repeat` rounds; each round runs the three in turn, with `--settle` seconds of quiet after each, so that
one's background work, such as a bkg worker rendering HTML and warming its next kernel, is not timed as another's):

- papermill CLI: `python -m papermill in.ipynb out.ipynb -p n 2` as a subprocess (a new interpreter and kernel).
- papermill in process: `papermill.execute_notebook` in this process (papermill starts and stops a kernel per call),
  after one warm-up call.
- bkg: `POST /api/jobs` to a real gateway (plugins: sysinfo) with its local pool of `--workers` job workers, each
  holding a warm kernel, then `GET /api/jobs/{id}` every `--poll` s until `finished_at` is set; wall time from the
  submit to seeing it finished. One warm-up run first (the pool starts with the first run; timed and shown).

`--burst` runs at once (submitted back to back, then the oldest unfinished run polled every `--poll` s): bkg's
local pool, and bkg on a `distributed.LocalCluster` of `--workers` single-thread worker processes started here
(a second gateway with `BKG_JOB_EXECUTOR=dask://...`, one warm-up run first; each Dask task starts a fresh
process and kernel). Peers: the same number of `papermill.execute_notebook` calls one after another in this
process, and on `--workers` threads (papermill is thread-safe as long as `cwd` is not passed, nteract/papermill
#473 and #578; a call that raises is counted as failed).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import nbformat

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from gateway_harness import ADMIN_KEY, Gateway, start_gateway  # noqa: E402

warnings.filterwarnings("ignore")


def notebook(path: Path) -> Path:
    """The trivial parameterised notebook: `n = 1` (tagged parameters), then `x = n * 2`."""
    nb = nbformat.v4.new_notebook()
    p = nbformat.v4.new_code_cell("n = 1")
    p.metadata["tags"] = ["parameters"]
    nb.cells = [p, nbformat.v4.new_code_cell("x = n * 2")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path


def client(gw: Gateway) -> httpx.Client:
    """One keep-alive client per gateway (a fresh client per request costs more than a run's polling)."""
    return httpx.Client(base_url=gw.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60)


def submit(c: httpx.Client, n: int) -> str:
    r = c.post("/api/jobs", json={"notebook": "trivial.ipynb", "parameters": {"n": n}})
    if r.status_code != 202:
        raise SystemExit(f"submit refused: {r.status_code} {r.text}")
    return str(r.json()["id"])


def wait_all(c: httpx.Client, ids: list[str], poll: float, timeout: float = 600) -> list[dict[str, Any]]:
    """Poll the oldest unfinished run until every run has finished; their records in `ids` order."""
    pending, done = list(ids), {}
    deadline = time.monotonic() + timeout
    while pending:
        r = c.get(f"/api/jobs/{pending[0]}").json()
        if r.get("finished_at"):
            done[pending.pop(0)] = r
            continue
        if time.monotonic() > deadline:
            raise SystemExit(f"runs not finished after {timeout} s: {pending}")
        time.sleep(poll)
    return [done[i] for i in ids]


def bkg_once(c: httpx.Client, poll: float, n: int = 2) -> tuple[float, dict[str, Any]]:
    """Submit one run and poll it until finished: wall seconds and its record."""
    t0 = time.perf_counter()
    (rec,) = wait_all(c, [submit(c, n)], poll)
    return time.perf_counter() - t0, rec


def bkg_burst(c: httpx.Client, n: int, poll: float) -> dict[str, Any]:
    t0 = time.perf_counter()
    ids = [submit(c, i) for i in range(n)]
    recs = wait_all(c, ids, poll)
    wall = time.perf_counter() - t0
    span = max(r["finished_at"] for r in recs) - min(r["created_at"] for r in recs)
    failed = [r for r in recs if r["state"] != "succeeded"]
    return {"wall": wall, "span": span, "failed": len(failed), "errors": [r.get("error") for r in failed][:3]}


def papermill_cli(src: Path, out: Path) -> float:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "papermill", str(src), str(out), "-p", "n", "2"], capture_output=True)
    took = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"papermill CLI failed: {r.stderr.decode()[-2000:]}")
    return took


def papermill_inproc(src: Path, out: Path, n: int = 2) -> float:
    import papermill as pm

    t0 = time.perf_counter()
    pm.execute_notebook(str(src), str(out), parameters={"n": n}, progress_bar=False)
    return time.perf_counter() - t0


def papermill_burst(src: Path, outdir: Path, n: int, threads: int) -> dict[str, Any]:
    """`n` execute_notebook calls, one after another (threads=1) or on a thread pool; failures counted."""
    errors: list[str] = []

    def one(i: int) -> None:
        try:
            papermill_inproc(src, outdir / f"t{threads}-{i}.ipynb", i)
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {str(exc)[:300]}")

    t0 = time.perf_counter()
    if threads == 1:
        for i in range(n):
            one(i)
    else:
        with ThreadPoolExecutor(threads) as ex:
            list(ex.map(one, range(n)))
    wall = time.perf_counter() - t0
    return {"wall": wall, "span": None, "failed": len(errors), "errors": errors[:3]}


def tail(path: Path, n: int = 40) -> str:
    if not path.exists():
        return f"({path} does not exist)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


def warmed_gateway(
    data: Path, env: dict[str, str], gws: list[Gateway], poll: float, label: str
) -> tuple[Gateway, httpx.Client, float, dict[str, Any]]:
    """Start a gateway (kept in `gws` for the clean-up) and time its warm-up run, which must succeed."""
    gw = start_gateway(data, env=env, plugins=["sysinfo"])
    gws.append(gw)
    c = client(gw)
    first, rec = bkg_once(c, poll)
    if rec["state"] != "succeeded":
        logs(gw)
        raise SystemExit(f"{label} warm-up run {rec['state']}: {rec.get('error')}")
    return gw, c, first, rec


def reported_burst(gw: Gateway, c: httpx.Client, args: Any, label: str, odd: list[str]) -> dict[str, Any]:
    """`args.burst` runs at once through `gw`; failures go into `odd` with the gateway's log tail."""
    out = bkg_burst(c, args.burst, args.poll)
    print(f"{label}: {out['wall']:.2f} s, {out['failed']} failed")
    if out["failed"]:
        odd.append(f"{label}: {out['failed']} failed: {out['errors']}")
        logs(gw)
    return out


def logs(gw: Gateway) -> None:
    print(f"--- gateway log tail ({gw.log}) ---\n{tail(gw.log)}")
    print(f"--- job workers log tail ---\n{tail(gw.data_dir / 'runs' / 'workers.log')}")


def fmt(x: float | None, d: int = 2) -> str:
    return "-" if x is None else f"{x:,.{d}f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=5, help="timed runs per system for the per-run overhead")
    ap.add_argument("--burst", type=int, default=20, help="runs submitted at once")
    ap.add_argument("--workers", type=int, default=2, help="bkg job workers, Dask workers and papermill threads")
    ap.add_argument("--poll", type=float, default=0.02, help="seconds between GETs while a run is unfinished")
    ap.add_argument("--settle", type=float, default=1.0, help="quiet seconds after each timed per-run measurement")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (notebooks, data dirs, gateway logs)")
    args = ap.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]

    work = Path(tempfile.mkdtemp(prefix="bkg-bench-jobs-"))
    roots = work / "roots"
    src = notebook(roots / "trivial.ipynb")
    outs = work / "out"
    outs.mkdir()
    env = {"BKG_JOB_ROOTS": str(roots), "BKG_JOB_WORKERS": str(args.workers)}
    gws: list[Gateway] = []
    cluster: Any = None
    odd: list[str] = []
    try:
        # -- per-run overhead --------------------------------------------------------------------------------
        gw, c, first, rec = warmed_gateway(work / "local" / "data", env, gws, args.poll, "bkg")
        print(f"bkg warm-up run (the pool of {args.workers} workers starts): {first:.2f} s")
        warm_cli = papermill_cli(src, outs / "cli-warm.ipynb")
        warm_in = papermill_inproc(src, outs / "in-warm.ipynb")
        print(f"papermill warm-up: CLI {warm_cli:.2f} s, in process {warm_in:.2f} s (first kernel start)")
        time.sleep(args.settle)
        cli_s: list[float] = []
        in_s: list[float] = []
        bkg_s: list[float] = []
        srv_s: list[float] = []
        queue_s: list[float] = []
        for i in range(args.repeat):
            cli_s.append(papermill_cli(src, outs / f"cli-{i}.ipynb"))
            time.sleep(args.settle)
            in_s.append(papermill_inproc(src, outs / f"in-{i}.ipynb"))
            time.sleep(args.settle)
            took, rec = bkg_once(c, args.poll)
            if rec["state"] != "succeeded":
                odd.append(f"bkg run {rec['id']} {rec['state']}: {rec.get('error')}")
            bkg_s.append(took)
            srv_s.append(rec["duration_s"])
            queue_s.append(rec["started_at"] - rec["created_at"])
            time.sleep(args.settle)
            print(f"round {i + 1}: CLI {cli_s[-1]:.3f} s, in process {in_s[-1]:.3f} s, bkg {bkg_s[-1]:.3f} s "
                  f"(server: queued {queue_s[-1]:.3f} s, ran {srv_s[-1]:.3f} s)")  # fmt: skip

        # -- burst: bkg local pool ---------------------------------------------------------------------------
        local = reported_burst(gw, c, args, "bkg local burst", odd)
        c.close()
        gw.stop()  # keep the load bounded: one system at a time on 2 cores

        # -- burst: papermill in process ---------------------------------------------------------------------
        seq = papermill_burst(src, outs, args.burst, 1)
        print(f"papermill sequential: {seq['wall']:.2f} s, {seq['failed']} failed")
        thr = papermill_burst(src, outs, args.burst, args.workers)
        print(f"papermill {args.workers} threads: {thr['wall']:.2f} s, {thr['failed']} failed {thr['errors']}")
        if thr["failed"]:
            odd.append(f"papermill on {args.workers} threads: {thr['failed']} failed: {thr['errors']}")

        # -- burst: bkg on a Dask LocalCluster ---------------------------------------------------------------
        from distributed import LocalCluster

        cluster = LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True, dashboard_address=None,
                               scheduler_port=0)  # fmt: skip
        address = cluster.scheduler_address.replace("tcp://", "dask://")
        env2 = {**env, "BKG_JOB_EXECUTOR": address}
        gw2, c2, first_dask, rec = warmed_gateway(work / "dask" / "data", env2, gws, args.poll, "bkg on Dask")
        if rec.get("executor") != address:
            odd.append(f"the Dask gateway's run says executor {rec.get('executor')!r}, not {address!r}")
        print(f"bkg on Dask warm-up run: {first_dask:.2f} s")
        time.sleep(args.settle)
        dask = reported_burst(gw2, c2, args, "bkg on Dask burst", odd)
        c2.close()

        # -- tables ------------------------------------------------------------------------------------------
        med_cli, med_in, med_bkg = (statistics.median(x) for x in (cli_s, in_s, bkg_s))
        print()
        print(f"Per run, trivial notebook (median of {args.repeat}; bkg polled every {args.poll * 1000:g} ms):")
        print()
        print("| system | median s/run | min s | max s | bkg / this |")
        print("|---|---|---|---|---|")
        for name, xs, med in (
            ("papermill CLI (`python -m papermill`, subprocess)", cli_s, med_cli),
            ("papermill.execute_notebook in one process (new kernel per call)", in_s, med_in),
            (f"bkg gateway, warm pool of {args.workers} (submit → seen finished)", bkg_s, med_bkg),
        ):
            print(f"| {name} | {fmt(med, 3)} | {fmt(min(xs), 3)} | {fmt(max(xs), 3)} | {med_bkg / med:.2f}x |")
        print()
        print(f"bkg server side (median): queued {statistics.median(queue_s):.3f} s, started → finished "
              f"{statistics.median(srv_s):.3f} s; first run with the pool starting {first:.2f} s.")  # fmt: skip
        print()
        n = args.burst
        print(f"{n} runs at once (wall time from the first submit / call until all finished):")
        print()
        print("| system | wall s | runs/s | failed | runs/s vs bkg local |")
        print("|---|---|---|---|---|")
        rate_local = n / local["wall"]
        for name, r in (
            (f"bkg, local pool ({args.workers} job workers, warm kernels)", local),
            (f"bkg, Dask LocalCluster ({args.workers} worker processes × 1 thread)", dask),
            ("papermill.execute_notebook, sequential, one process", seq),
            (f"papermill.execute_notebook, {args.workers} threads, one process", thr),
        ):
            rate = n / r["wall"]
            print(f"| {name} | {fmt(r['wall'])} | {fmt(rate)} | {r['failed']} of {n} | {rate / rate_local:.2f}x |")
        print()
        print(f"bkg server-side span (first created_at → last finished_at): local {local['span']:.2f} s, "
              f"Dask {dask['span']:.2f} s; Dask warm-up run {first_dask:.2f} s.")  # fmt: skip
        if odd:
            print("\nOdd:")
            for line in odd:
                print(f"- {line}")
    finally:
        for g in gws:
            g.stop()
        if cluster is not None:
            cluster.close()
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
