"""The `bkg` command line: `bkg --help` lists every command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from bkg_kernel.errors import BkgError

app = typer.Typer(help="bkg: a notebook-first ML research workbench.", no_args_is_help=True, add_completion=False)
store_app = typer.Typer(help="Collections and snapshots in the DuckDB + FAISS store.", no_args_is_help=True)
app.add_typer(store_app, name="store")

DataDir = Annotated[Path | None, typer.Option("--data-dir", help="Data dir (default: BKG_DATA_DIR or ./data).")]


def _print(obj: Any) -> None:
    data = obj.to_dict() if hasattr(obj, "to_dict") else obj
    typer.echo(json.dumps(data, indent=2, default=str))


def _store(data_dir: Path | None) -> Any:
    from bkg_kernel.store import Store

    return Store(data_dir)


@app.command()
def version() -> None:
    """Print the bkg version."""
    from bkg_kernel import __version__

    typer.echo(__version__)


@app.command()
def settings() -> None:
    """Print the effective settings (defaults < bkg.toml < BKG_* environment)."""
    from bkg_kernel.settings import Settings

    typer.echo(Settings().model_dump_json(indent=2))


@app.command()
def lab(
    port: Annotated[int, typer.Option(help="JupyterLab port.")] = 8888,
    notebook_dir: Annotated[Path, typer.Option(help="Folder JupyterLab opens.")] = Path("notebooks"),
    open_browser: Annotated[bool, typer.Option(help="Open a browser tab.")] = False,
) -> None:
    """Run JupyterLab on the notebooks folder (Ctrl-C stops it)."""
    cmd = [
        sys.executable,
        "-m",
        "jupyterlab",
        f"--port={port}",
        f"--notebook-dir={notebook_dir}",
        "--ip=127.0.0.1",
    ]
    if not open_browser:
        cmd.append("--no-browser")
    if os.geteuid() == 0:
        cmd.append("--allow-root")
    raise typer.Exit(subprocess.call(cmd))


@store_app.command("list")
def store_list(data_dir: DataDir = None) -> None:
    """List collections with their size and last snapshot."""
    with _store(data_dir) as s:
        _print([c.to_dict() for c in s.list_collections()])


@store_app.command("create")
def store_create(
    name: str,
    dim: Annotated[int, typer.Option(help="Vector dimension.")],
    metric: Annotated[str, typer.Option(help="cosine | l2 | ip")] = "cosine",
    index: Annotated[str, typer.Option(help="flat | hnsw | ivf")] = "flat",
    data_dir: DataDir = None,
) -> None:
    """Create a collection."""
    with _store(data_dir) as s:
        s.create_collection(name, dim, metric, index)
        _print(s.describe(name))


@store_app.command("describe")
def store_describe(name: str, data_dir: DataDir = None) -> None:
    """Describe one collection."""
    with _store(data_dir) as s:
        _print(s.describe(name))


@store_app.command("drop")
def store_drop(
    name: str,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
    data_dir: DataDir = None,
) -> None:
    """Drop a collection (its snapshots stay)."""
    if not yes:
        typer.confirm(f"Drop collection {name!r}?", abort=True)
    with _store(data_dir) as s:
        s.drop_collection(name)
    typer.echo(f"dropped {name}")


@store_app.command("snapshot")
def store_snapshot(name: str, data_dir: DataDir = None) -> None:
    """Write a snapshot archive of a collection."""
    with _store(data_dir) as s:
        _print(s.snapshot(name))


@store_app.command("snapshots")
def store_snapshots(name: Annotated[str | None, typer.Argument()] = None, data_dir: DataDir = None) -> None:
    """List snapshots (of one collection, or all)."""
    with _store(data_dir) as s:
        _print([x.to_dict() for x in s.list_snapshots(name)])


@store_app.command("restore")
def store_restore(
    name: str,
    snapshot_id: str,
    into: Annotated[str | None, typer.Option(help="Restore into this new collection name.")] = None,
    data_dir: DataDir = None,
) -> None:
    """Restore a snapshot into the same collection (replacing it) or a new one."""
    with _store(data_dir) as s:
        coll = s.restore_snapshot(name, snapshot_id, into)
        _print(s.describe(coll.name))


@store_app.command("delete-snapshot")
def store_delete_snapshot(name: str, snapshot_id: str, data_dir: DataDir = None) -> None:
    """Delete one snapshot archive."""
    with _store(data_dir) as s:
        s.delete_snapshot(name, snapshot_id)
    typer.echo(f"deleted {snapshot_id}")


def main() -> None:
    """Run the CLI; a BkgError prints one clear line and exits 2 instead of a traceback."""
    try:
        app()
    except BkgError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
