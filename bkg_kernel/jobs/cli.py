"""`bkg jobs ...`: run, watch, cancel, retry and schedule notebook jobs on the gateway, as the caller (the data
dir's workbench key or BKG_API_KEY, never the admin key). Parameters are given as papermill takes them: `-f FILE`
(YAML or JSON), `-y YAML`, `-p NAME VALUE`, merged in that order (a later one wins)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from bkg_kernel.client.jobs import failure
from bkg_kernel.errors import InvalidInput
from bkg_kernel.jobs.notebooks import coerce
from bkg_kernel.settings import folder_option

app = typer.Typer(help="Notebook jobs (papermill): run, schedule, history.", no_args_is_help=True)
Url = Annotated[str | None, typer.Option("--url", help="Gateway URL (default: the data dir's gateway).")]


def folder_opt(option: str, field: str, text: str) -> Any:
    """A folder option (`--data-dir`), checked as the settings check it (`settings.folder_option`)."""
    return typer.Option(option, parser=folder_option(field, option), metavar="PATH", help=text)


DataDir = Annotated[Path | None, folder_opt("--data-dir", "data_dir", "Data dir (default: BKG_DATA_DIR or ./data).")]
Params = Annotated[
    list[str] | None,
    typer.Option(
        "-p",
        "--parameter",
        help="NAME VALUE (repeatable; the value is read as the parameter's type).",
        metavar="NAME VALUE",
    ),  # fmt: skip
]
ParamsYaml = Annotated[
    list[str] | None,
    typer.Option(
        "-y",
        "--parameters-yaml",
        "--parameters_yaml",
        help="Parameters as YAML (or JSON): -y 'n: 5' (repeatable; -p wins over it).",
        metavar="YAML",
    ),
]
ParamsFile = Annotated[
    list[Path] | None,
    typer.Option(
        "-f",
        "--parameters-file",
        "--parameters_file",
        help="A YAML or JSON file of parameters (repeatable; -y and -p win over it).",
        metavar="FILE",
    ),
]
Timeout = Annotated[float | None, typer.Option("--timeout", help="Whole-run limit in seconds (then timed_out).")]
Retries = Annotated[int, typer.Option("--retries", help="Automatic re-runs after a failure.")]


def _wb(url: str | None, data_dir: Path | None) -> Any:
    from bkg_kernel.client import connect
    from bkg_kernel.client.workbench import is_gateway

    wb = connect(url, data_dir=data_dir, start=False)  # as the other gateway commands: no gateway is an error
    is_gateway(wb.url)
    return wb


def _echo(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=2, default=str))


def _mapping(text: str, where: str, option: str) -> dict[str, Any]:
    """Parameters given as YAML (JSON is YAML too), dates left as text as papermill leaves them."""
    try:
        import yaml
    except ImportError:  # PyYAML comes with papermill and uvicorn[standard]; without it, JSON still reads
        yaml = None
    bad: tuple[type[Exception], ...] = (ValueError, TypeError, *((yaml.YAMLError,) if yaml is not None else ()))
    try:
        if yaml is not None:
            value = yaml.load(text, Loader=_no_dates(yaml))  # noqa: S506  (a SafeLoader)
        else:
            value = json.loads(text) if text.strip() else None
        json.dumps(value)  # what the gateway is sent (no YAML sets or binary)
    except bad as exc:
        why = " ".join(str(exc).split())
        raise InvalidInput(f"{where} is not parameters as YAML or JSON: {why}", field=option) from None
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise InvalidInput(f"{where} must be a mapping of parameter names to values", field=option)
    return value


def _no_dates(yaml: Any) -> Any:
    """PyYAML's safe loader reading `2024-01-02` as text, not a date (papermill's `NoDatesSafeLoader`)."""
    stamp = "tag:yaml.org,2002:timestamp"
    resolvers = {k: [r for r in v if r[0] != stamp] for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    return type("NoDatesSafeLoader", (yaml.SafeLoader,), {"yaml_implicit_resolvers": resolvers})


def _params(
    wb: Any,
    notebook: str,
    raw: list[str] | None,
    extra: list[str],
    yamls: list[str] | None = None,
    files: list[Path] | None = None,
) -> dict[str, Any]:
    """Merge `-f FILE`, then `-y YAML`, then `-p name value` (a later one wins, as in papermill). `-p` pairs are
    paired up here (typer hands over `-p name` and leaves the value among the extra arguments), each value read as
    its parameter's type in the notebook the gateway will run for `notebook` (`./x.ipynb`, a full path: the gateway
    finds it as the run will, and refuses it as the run would)."""
    names = list(raw or [])
    if len(extra) != len(names):
        unknown = next((a for a in extra if a.startswith("-") and not _number(a)), None)
        if unknown is not None:
            raise typer.BadParameter(f"no such option {unknown} (parameters: -p NAME VALUE, -y YAML, -f FILE)")
        raise typer.BadParameter("give each parameter as -p NAME VALUE", param_hint="-p")
    merged: dict[str, Any] = {}
    for f in files or []:
        try:
            text = f.read_text(encoding="utf-8")
        except (OSError, UnicodeError) as exc:
            raise InvalidInput(f"cannot read {f}: {getattr(exc, 'strerror', None) or exc}", field="-f") from None
        merged.update(_mapping(text, str(f), "-f"))
    for y in yamls or []:
        merged.update(_mapping(y, repr(y), "-y"))
    if names:
        found = wb.jobs.notebooks(notebook)
        declared = (found[0] if found else {}).get("parameters") or {}
        merged.update({n: coerce(v, (declared.get(n) or {}).get("type")) for n, v in zip(names, extra, strict=True)})
    return merged


def _number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _line(r: dict[str, Any]) -> str:
    why = f"  {failure(r.get('error'))}" if r.get("error") else ""
    dur = f"{r['duration_s']:.1f}s" if r.get("duration_s") is not None else "-"
    return f"{r['id']:<18} {r['state']:<10} {r.get('notebook', r.get('kind')):<36} {r.get('owner')}  {dur}{why}"


@app.command("run", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def run(
    ctx: typer.Context,
    notebook: str,
    p: Params = None,
    y: ParamsYaml = None,
    f: ParamsFile = None,
    timeout: Timeout = None,
    retries: Retries = 0,
    detach: Annotated[bool, typer.Option("--detach", help="Print the run id and return at once.")] = False,
    url: Url = None,
    data_dir: DataDir = None,
) -> None:
    """Run a notebook under the job roots (`bkg jobs run jobs/x.ipynb -p folder docs -p n 5`, `-y 'n: 5'`)."""
    wb = _wb(url, data_dir)
    params = _params(wb, notebook, p, ctx.args, y, f)
    run = wb.jobs.submit(notebook, params, timeout_s=timeout, retries=retries)
    typer.echo(run["id"])
    if detach:
        return
    done = wb.jobs.wait(run["id"], cancel_hint="`bkg jobs cancel {id}`")
    typer.echo(_line(done))
    if done.get("error", {}) and done["error"].get("traceback"):
        typer.echo(done["error"]["traceback"], err=True)
    if done["state"] != "succeeded":
        raise typer.Exit(1)


@app.command("list")
def list_runs(
    limit: Annotated[int, typer.Option(min=1, help="How many runs, newest first.")] = 30,
    before: Annotated[str | None, typer.Option("--before", help="Only runs older than this run id.")] = None,
    url: Url = None,
    data_dir: DataDir = None,
) -> None:
    """Recent runs, newest first (`--before <the last id shown>` for the ones before them)."""
    for r in _wb(url, data_dir).jobs.list(limit, before):
        typer.echo(_line(r))


@app.command("show")
def show(run_id: str, url: Url = None, data_dir: DataDir = None) -> None:
    """One run as JSON (state, cells, output, the failed cell)."""
    _echo(dict(_wb(url, data_dir).jobs.get(run_id)))


@app.command("output")
def output(
    run_id: str,
    html: Annotated[bool, typer.Option("--html", help="The run's HTML page instead of its notebook.")] = False,
    out: Annotated[
        Path | None, typer.Option("-o", "--output", help="Write it to FILE (default: stdout).", metavar="FILE")
    ] = None,
    url: Url = None,
    data_dir: DataDir = None,
) -> None:
    """A run's output notebook (`--html`: its HTML page), to stdout or `-o FILE`."""
    text = str(_wb(url, data_dir).jobs.output(run_id, "html" if html else "ipynb"))
    if out is None:
        typer.echo(text, nl=not text.endswith("\n"))
        return
    _write_out(out, text.encode())


@app.command("files")
def files(
    run_id: str,
    name: Annotated[
        str | None, typer.Argument(help="One kept file, to stdout or -o FILE (default: all, listed).")
    ] = None,
    out: Annotated[
        Path | None, typer.Option("-o", "--output", help="Write the file to FILE (default: stdout).", metavar="FILE")
    ] = None,
    url: Url = None,
    data_dir: DataDir = None,
) -> None:
    """The files a run kept (what its notebook wrote into its `BKG_RUN_FILES` folder), or one of them."""
    if name is None and out is not None:
        raise InvalidInput("-o writes one file: name the kept file to write (`bkg jobs files RUN_ID`)", field="-o")
    jobs = _wb(url, data_dir).jobs
    if name is None:
        for f in jobs.files(run_id):
            typer.echo(f"{f['bytes']:>12,}  {f['name']}")
        return
    data = jobs.file(run_id, name)
    if out is None:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
        return
    _write_out(out, data)


def _write_out(out: Path, data: bytes) -> None:
    """Write `-o FILE` (a clear error naming -o when it cannot be written)."""
    try:
        out.write_bytes(data)
    except OSError as exc:
        raise InvalidInput(f"cannot write {out}: {exc.strerror or exc}", field="-o") from None


@app.command("cancel")
def cancel(run_id: str, url: Url = None, data_dir: DataDir = None) -> None:
    """Cancel a queued or running run (shown once it ended; still ending after a few seconds: `cancelling`)."""
    r = _wb(url, data_dir).jobs.cancel(run_id)
    typer.echo(_line(r if r.get("finished_at") is not None else {**r, "state": "cancelling"}))


@app.command("retry")
def retry(run_id: str, url: Url = None, data_dir: DataDir = None) -> None:
    """Run a finished run again; prints the new run id."""
    typer.echo(_wb(url, data_dir).jobs.retry(run_id)["id"])


@app.command("notebooks")
def notebooks(url: Url = None, data_dir: DataDir = None) -> None:
    """Notebooks that may run as jobs, with their parameters."""
    for n in _wb(url, data_dir).jobs.notebooks():
        params = ", ".join(f"{k}: {v['type']} = {v['default']}" for k, v in (n["parameters"] or {}).items())
        typer.echo(f"{n['notebook']:<40} {params}")


@app.command("schedule", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def schedule(
    ctx: typer.Context,
    notebook: str,
    cron: str,
    p: Params = None,
    y: ParamsYaml = None,
    f: ParamsFile = None,
    tz: Annotated[str, typer.Option("--tz", help="IANA time zone the cron is read in.")] = "UTC",
    timeout: Timeout = None,
    retries: Retries = 0,
    webhook: Annotated[str | None, typer.Option("--webhook", help="URL called when a run fails.")] = None,
    url: Url = None,
    data_dir: DataDir = None,
) -> None:
    """Run a notebook on a cron schedule (`bkg jobs schedule jobs/x.ipynb "0 3 * * *" --tz Europe/Paris`)."""
    wb = _wb(url, data_dir)
    opts: dict[str, Any] = {"timeout_s": timeout, "retries": retries, "webhook_url": webhook}
    s = wb.jobs.schedule(notebook, cron, _params(wb, notebook, p, ctx.args, y, f), timezone=tz, **opts)
    typer.echo(f"{s['id']}  next run {_when(s['next_run_at'])}")


def _when(t: float | None) -> str:
    import time

    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(t)) if t else "-"


@app.command("schedules")
def schedules(url: Url = None, data_dir: DataDir = None) -> None:
    """Schedules with their next run time."""
    for s in _wb(url, data_dir).jobs.schedules():
        state = "on " if s["enabled"] else "off"
        typer.echo(f"{s['id']:<18} {state} {s['cron']:<16} {s['timezone']:<14} {s['notebook']:<36} "
                   f"next {_when(s['next_run_at'])}")  # fmt: skip


@app.command("enable")
def enable(schedule_id: str, url: Url = None, data_dir: DataDir = None) -> None:
    """Enable a schedule."""
    _echo(_wb(url, data_dir).jobs.enable(schedule_id))


@app.command("disable")
def disable(schedule_id: str, url: Url = None, data_dir: DataDir = None) -> None:
    """Disable a schedule."""
    _echo(_wb(url, data_dir).jobs.disable(schedule_id))


@app.command("delete")
def delete(
    job_id: Annotated[str, typer.Argument(metavar="RUN_ID|SCHEDULE_ID")], url: Url = None, data_dir: DataDir = None
) -> None:
    """Delete a finished run and the files it left (`run-...`), or a schedule (its runs stay)."""
    jobs = _wb(url, data_dir).jobs
    if job_id.startswith("run-"):
        jobs.delete(job_id)
    else:
        jobs.delete_schedule(job_id)
    typer.echo(f"deleted {job_id}")
