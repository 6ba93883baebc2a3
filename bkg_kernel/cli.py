"""The `bkg` command line: `bkg --help` lists every command."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from typer.core import TyperCommand, TyperOption

from bkg_kernel import kernels
from bkg_kernel.client.transport import seg
from bkg_kernel.errors import BkgError, Conflict, InvalidInput
from bkg_kernel.jobs import cli as jobs_cli
from bkg_kernel.jobs.cli import DataDir, folder_opt
from bkg_kernel.jobs.cli import app as jobs_app

app = typer.Typer(help="bkg: a notebook-first ML research workbench.", no_args_is_help=True, add_completion=False)
store_app = typer.Typer(help="Collections and snapshots in the DuckDB + FAISS store.", no_args_is_help=True)
plugins_app = typer.Typer(help="Plugins of the running gateway.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys (admin).", no_args_is_help=True)
users_app = typer.Typer(help="Users (admin).", no_args_is_help=True)
models_app = typer.Typer(help="The model registry (<model dir>/manifest.json).", no_args_is_help=True)
app.add_typer(store_app, name="store")
app.add_typer(plugins_app, name="plugins")
app.add_typer(keys_app, name="keys")
app.add_typer(users_app, name="users")
app.add_typer(models_app, name="models")
app.add_typer(jobs_app, name="jobs")


ModelDir = Annotated[
    Path | None, folder_opt("--model-dir", "model_dir", "Model dir (default: BKG_MODEL_DIR or ./models).")
]
Yes = Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")]
# a server's port: 1..65535 (a Jupyter server alone takes 0, any free port, and prints the one it took)
LabPort = Annotated[int, typer.Option("--port", min=0, max=65535, help="JupyterLab port (0: any free one).")]
DashboardsPort = Annotated[int, typer.Option(min=1, max=65535, help="Voila dashboards port.")]


def _print(obj: Any) -> None:
    data = obj.to_dict() if hasattr(obj, "to_dict") else obj
    typer.echo(json.dumps(data, indent=2, default=str))


@contextlib.contextmanager
def _store(data_dir: Path | None, *, made: bool = True) -> Iterator[Any]:
    """The data dir's store, open for one command. A command that acts on what is there (`made`) refuses a folder
    that holds no store, naming it, and makes nothing (a mistyped --data-dir got a new empty store); one that may
    make the store (create, restore) and fails leaves nothing of its own in a folder that held none."""
    from bkg_kernel.errors import NotFound
    from bkg_kernel.settings import get_settings
    from bkg_kernel.store import Store
    from bkg_kernel.store.store import DB_NAME, STORE_ENTRIES

    settings = get_settings()  # read first: a bkg.toml that cannot be used is what to say, whatever the folder
    ddir = Path(data_dir if data_dir is not None else settings.data_dir).resolve()
    if (ddir / DB_NAME).is_file():
        with Store(ddir) as store:
            yield store
        return
    if made:
        raise NotFound(
            f"no bkg store in {ddir}: {DB_NAME} does not exist there (a gateway makes it at its first start, `bkg "
            "serve` or `bkg run`, and so does `bkg store create`); --data-dir or BKG_DATA_DIR names another",
            field="data_dir",
        )
    made_dirs = [p for p in [ddir, *ddir.parents] if not p.exists()]  # the folders this command makes, deepest first
    # only what the store itself makes, and only what was not there: another process's files in the folder stay (a
    # failed create in a shared folder deleted everything new in it)
    there = {p.name for p in ddir.iterdir()} if ddir.is_dir() else set()
    try:
        with Store(ddir) as store:
            yield store
    except BaseException:
        # a file in the way of the folder: nothing was made in it (its cleanup hid the error under a traceback)
        for name in STORE_ENTRIES - there if ddir.is_dir() else ():
            path = ddir / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        for folder in made_dirs:  # the folders it made, while nothing else is in them
            try:
                folder.rmdir()
            except OSError:
                break
        raise


@app.command()
def version() -> None:
    """Print the bkg version."""
    from bkg_kernel import __version__

    typer.echo(__version__)


@app.command()
def settings() -> None:
    """Print the effective settings (defaults < bkg.toml < BKG_* environment); keys and tokens as set or not, never
    their values."""
    from bkg_kernel.settings import Settings

    shown = json.loads(Settings().model_dump_json())
    for name in ("admin_key", "api_key", "hub_api_token"):
        if shown.get(name):
            shown[name] = "(set)"
    typer.echo(json.dumps(shown, indent=2))


@app.command()
def lab(
    port: LabPort = 8888,
    notebook_dir: Annotated[Path, typer.Option(help="Folder JupyterLab opens.")] = Path("notebooks"),
    open_browser: Annotated[bool, typer.Option(help="Open a browser tab.")] = False,
) -> None:
    """Run JupyterLab on the notebooks folder (Ctrl-C stops it)."""
    from bkg_kernel.settings import Settings

    _folder(notebook_dir, "notebooks", "run this in the bkg checkout, or pass --notebook-dir", "notebook_dir")
    _port_free(port, "--port")
    _exec(lab_cmd(port, notebook_dir, open_browser), lab_env(api_key=Settings().api_key))


def lab_cmd(port: int, notebook_dir: Path, open_browser: bool) -> list[str]:
    """The JupyterLab command line (bound to 127.0.0.1, on `port` or not at all). Run it with `lab_env()`."""
    cmd = [sys.executable, "-m", "jupyterlab", f"--port={port}", f"--notebook-dir={notebook_dir}", "--ip=127.0.0.1"]
    cmd.append("--ServerApp.port_retries=0")  # a taken port is an error, not a lab on another port than was said
    cmd.append(kernels.LAB_KERNEL_MANAGER)  # kernels over Unix sockets in a private folder, not TCP ports
    if not open_browser:
        cmd.append("--no-browser")
    if os.geteuid() == 0:
        cmd.append("--allow-root")
    return cmd


def dashboards_cmd(port: int, folder: Path) -> list[str]:
    """The Voila command line: safe defaults (no tracebacks, sources stripped), a preheated kernel each, and bkg's
    template (no CDN; `?theme=dark` for the dark theme). Run it with `dashboards_env()`."""
    return [
        sys.executable, "-m", "voila", str(folder), f"--port={port}", "--Voila.ip=127.0.0.1", "--no-browser",
        "--show_tracebacks=False", "--strip_sources=True", "--preheat_kernel=True", "--pool_size=1",
        "--theme=light", "--VoilaConfiguration.allow_theme_override=YES", "--template=bkg",
        "--Voila.port_retries=0",  # a taken port is an error, not dashboards on another port than was announced
        # kernels over Unix sockets, not TCP ports that another process may take between their pick and their bind
        "--KernelManager.transport=ipc",
    ]  # fmt: skip


def dashboards_env(gateway_url: str | None = None) -> dict[str, str]:
    """The environment for `dashboards_cmd`: bkg's Voila template on the Jupyter path, the gateway to use, and no
    credential. Voila asks nobody for a token, so whatever its kernels hold serves whoever opens a page: every
    dashboard asks for a login instead (a Hub user's token here would log anyone in as them)."""
    from bkg_kernel.settings import Settings, scrubbed_env

    settings = Settings()
    if not gateway_url and settings.hub_user and settings.hub_api_token:  # the Hub's bkg service, found here: the
        from bkg_kernel.client.workbench import hub_gateway  # token that finds it stays in this process

        with contextlib.suppress(BkgError):
            gateway_url = hub_gateway(settings)
    share = Path(__file__).resolve().parent / "widgets" / "share"
    env = scrubbed_env()
    env["JUPYTER_PATH"] = os.pathsep.join(filter(None, [str(share), os.environ.get("JUPYTER_PATH")]))
    if gateway_url:
        env["BKG_GATEWAY_URL"] = gateway_url
    return env


def lab_env(
    gateway_url: str | None = None,
    api_key: str | None = None,
    dashboards_url: str | None = None,
    dashboards_dir: Path | None = None,
) -> dict[str, str]:
    """The environment for `lab_cmd`: this process's without the secrets no lab may inherit (the admin key, Hub
    tokens: every kernel of the lab would hold them), and with the gateway, the key and the dashboards that the
    lab's server side and its kernels use set explicitly."""
    from bkg_kernel.settings import scrubbed_env

    env = scrubbed_env()
    named = {"BKG_GATEWAY_URL": gateway_url, "BKG_API_KEY": api_key, "BKG_DASHBOARDS_URL": dashboards_url,
             "BKG_DASHBOARDS_DIR": str(dashboards_dir) if dashboards_dir else None}  # fmt: skip
    env.update({name: value for name, value in named.items() if value})
    return env


@app.command()
def dashboards(
    port: DashboardsPort = 8866,
    folder: Annotated[Path, typer.Option(help="Folder of dashboard notebooks.")] = Path("dashboards"),
    url: Annotated[str | None, typer.Option("--url", help="Gateway URL (default: the data dir's gateway).")] = None,
) -> None:
    """Serve the operator dashboards with Voila (each asks for a bkg login; Ctrl-C stops it)."""
    _folder(folder, "dashboards", "run this in the bkg checkout, or pass --folder", "folder")
    _port_free(port, "--port")
    _exec(dashboards_cmd(port, folder), dashboards_env(url))


def _exec(cmd: list[str], env: dict[str, str]) -> NoReturn:
    """Become the server `cmd` starts: Ctrl-C and a SIGTERM reach it, and no server outlives a parent that was
    stopped (as `bkg hub` becomes JupyterHub)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, cmd, env)


def _port_free(port: int, option: str) -> None:
    """Refuse a port of 127.0.0.1 that something listens on before a server is started on it: started anyway, the
    server fails after its start (with no port retries) or moves to another port than the one said."""
    if port == 0:  # any free port, which the server takes and prints
        return
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind: a TIME_WAIT is no listener
        try:
            s.bind(("127.0.0.1", port))
        except OSError as exc:
            field = option.lstrip("-").replace("-", "_")
            if exc.errno == errno.EADDRINUSE:
                raise Conflict(f"cannot listen on 127.0.0.1:{port}: the port is in use; choose another with {option}",
                               field=field) from None  # fmt: skip
            raise InvalidInput(f"cannot listen on 127.0.0.1:{port} ({option}): {exc.strerror or exc}",
                               field=field) from None  # fmt: skip


def _folder(path: Path, what: str, hint: str, field: str | None = None) -> None:
    """Refuse a folder that is not there before a server is started on it (Voila's answer was a traceback)."""
    if not path.is_dir():
        raise InvalidInput(f"no {what} folder at {path.resolve()}: {hint}", field=field)


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address (default BKG_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default BKG_PORT).")] = None,
    data_dir: DataDir = None,
    plugins: Annotated[
        str | None, typer.Option(help="Comma-separated plugin ids to host (default: every discovered plugin).")
    ] = None,
) -> None:
    """Run the gateway in the foreground until SIGINT / SIGTERM (then plugins stop and it exits)."""
    from bkg_kernel.gateway.server import serve as run
    from bkg_kernel.settings import Settings

    overrides: dict[str, Any] = {"host": host, "port": port, "data_dir": data_dir}
    only = [p.strip() for p in plugins.split(",") if p.strip()] if plugins else None
    run(Settings(**{k: v for k, v in overrides.items() if v is not None}), only)


def _wb(url: str | None, data_dir: Path | None) -> Any:
    from bkg_kernel.client import connect
    from bkg_kernel.client.workbench import is_gateway

    # a person at the bkg CLI, asking; without --url the admin key goes to the data dir's own gateway alone
    wb = connect(url, data_dir=data_dir, start=False, admin=True)
    is_gateway(wb.url)  # another server on the port: one line, before any answer of its is read
    return wb


Url = Annotated[str | None, typer.Option("--url", help="Gateway URL (default: the data dir's gateway).")]


@app.command()
def status(url: Url = None, data_dir: DataDir = None) -> None:
    """Show the gateway's health and every plugin's state."""
    _print(_wb(url, data_dir).health())


@plugins_app.command("list")
def plugins_list(url: Url = None, data_dir: DataDir = None) -> None:
    """List plugins with state and telemetry."""
    for p in _wb(url, data_dir).plugins:
        t = p["telemetry"]
        typer.echo(f"{p['id']:<12} {p['state']:<9} {p['mode']:<7} up {t['uptime_s']:>8.0f}s  {p['reason'] or ''}")


def _plugin_action(action: str) -> None:
    def cmd(plugin_id: str, url: Url = None, data_dir: DataDir = None) -> None:
        _print(getattr(_wb(url, data_dir).plugin(plugin_id), action)())

    cmd.__doc__ = f"{action.capitalize()} a plugin."
    plugins_app.command(action)(cmd)


for _action in ("start", "stop", "restart"):
    _plugin_action(_action)


@plugins_app.command("logs")
def plugins_logs(
    plugin_id: str,
    limit: Annotated[int, typer.Option(help="Lines.")] = 50,
    level: Annotated[str | None, typer.Option(help="Minimum level.")] = None,
    url: Url = None,
    data_dir: DataDir = None,
) -> None:
    """Print a plugin's newest log lines."""
    import time as _t

    for line in _wb(url, data_dir).plugin(plugin_id).logs(limit, level):
        stamp = _t.strftime("%H:%M:%S", _t.localtime(line["time"]))
        typer.echo(f"{stamp} {line['level']:<7} {line['message']}")


@keys_app.command("list")
def keys_list(url: Url = None, data_dir: DataDir = None) -> None:
    """List API keys (no secrets)."""
    _print(_wb(url, data_dir).keys())


@keys_app.command("create")
def keys_create(
    name: str,
    user: Annotated[str | None, typer.Option(help="Owner user id or name (default: you).")] = None,
    scope: Annotated[list[str] | None, typer.Option(help="Scope (repeat); default: all of the owner's.")] = None,
    expires_in_days: Annotated[float | None, typer.Option(help="Expire after this many days.")] = None,
    rate_limit: Annotated[int | None, typer.Option(help="Requests per minute.")] = None,
    url: Url = None,
    data_dir: DataDir = None,
) -> None:
    """Create a key and print its secret (shown this once)."""
    wb = _wb(url, data_dir)
    body = {"user_id": user, "scopes": scope, "expires_in_days": expires_in_days, "rate_limit_per_min": rate_limit}
    _print(wb.create_key(name, **body))


@keys_app.command("recover-admin")
def keys_recover_admin(data_dir: DataDir = None) -> None:
    """With the gateway stopped: a new admin key in <data dir>/admin.key (mode 0600), for a lost admin.key."""
    from bkg_kernel.auth import AuthService

    with _store(data_dir) as store:  # one owner at a time: refused, naming the holder, while a gateway runs
        auth = AuthService(store)
        try:
            path = auth.recover_admin_key(store.data_dir)
        finally:
            auth.close()
    typer.echo(f"admin API key: {path} (mode 0600); the admin's other keys still work until revoked")


@keys_app.command("rotate")
def keys_rotate(key_id: str, url: Url = None, data_dir: DataDir = None) -> None:
    """Give a key a new secret (the old one stops working)."""
    _print(_wb(url, data_dir).call("POST", f"/admin/keys/{seg(key_id)}/rotate"))


@keys_app.command("revoke")
def keys_revoke(key_id: str, url: Url = None, data_dir: DataDir = None) -> None:
    """Revoke a key."""
    _print(_wb(url, data_dir).call("POST", f"/admin/keys/{seg(key_id)}/revoke"))


@users_app.command("list")
def users_list(url: Url = None, data_dir: DataDir = None) -> None:
    """List users."""
    _print(_wb(url, data_dir).users())


@users_app.command("create")
def users_create(
    username: str,
    role: Annotated[str, typer.Option(help="admin | developer | viewer | a custom role")] = "viewer",
    password: Annotated[str | None, typer.Option(help="Password (8+ characters).")] = None,
    url: Url = None,
    data_dir: DataDir = None,
) -> None:
    """Create a user."""
    _print(_wb(url, data_dir).create_user(username, role, password))


def _user_patch(name: str, body: dict[str, Any], doc: str) -> None:
    def cmd(user_id: str, url: Url = None, data_dir: DataDir = None) -> None:
        _print(_wb(url, data_dir).call("PATCH", f"/admin/users/{seg(user_id)}", json=body))

    cmd.__doc__ = doc
    users_app.command(name)(cmd)


_user_patch("disable", {"disabled": True}, "Disable a user (their keys stop working).")
_user_patch("enable", {"disabled": False}, "Enable a user.")


@users_app.command("passwd")
def users_passwd(
    user_id: str,
    password: Annotated[str, typer.Option(prompt=True, hide_input=True, confirmation_prompt=True)],
    url: Url = None,
    data_dir: DataDir = None,
) -> None:
    """Set a user's password."""
    _print(_wb(url, data_dir).call("PATCH", f"/admin/users/{seg(user_id)}", json={"password": password}))


@users_app.command("delete")
def users_delete(user_id: str, url: Url = None, data_dir: DataDir = None) -> None:
    """Delete a user (their keys are revoked)."""
    _print(_wb(url, data_dir).call("DELETE", f"/admin/users/{seg(user_id)}"))


@app.command("hub")
def hub_cmd(
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port the Hub's proxy listens on (127.0.0.1).")] = 8000,
    data_dir: DataDir = None,
    dummy_auth: Annotated[bool, typer.Option("--dummy-auth", help="Any user name, any password (a trial).")] = False,
    admin: Annotated[list[str] | None, typer.Option("--admin", help="Hub admins, who are bkg admins.")] = None,
    developer: Annotated[list[str] | None, typer.Option("--developer", help="Users in bkg-developers.")] = None,
    state_dir: Annotated[Path, typer.Option(help="The Hub's database, cookie secret, pid files.")] = Path(
        "jupyterhub-state"
    ),
    config: Annotated[Path | None, typer.Option(help="A JupyterHub config (default: deploy/).")] = None,
) -> None:
    """Run JupyterHub with the bkg gateway as a managed service (local trial: `bkg hub --dummy-auth --admin me`)."""
    from bkg_kernel import hub
    from bkg_kernel.settings import get_settings
    from bkg_kernel.store.lock import make_data_dir

    ddir = data_dir or get_settings().data_dir
    command = hub.hub_command(config)  # a config that is not there: one line, before anything is said or made
    _port_free(port, "--port")  # taken: one line, not a Hub whose proxy fails after the Hub said it runs
    _state_dir(state_dir, make=False)  # before the data dir is made: a refused call leaves nothing behind
    make_data_dir(Path(ddir))  # a file by that name: one line, not a Hub that starts and times out
    _state_dir(state_dir)  # the same for the Hub's own folder (the config's mkdir was a traceback)
    env = hub.hub_env(port=port, data_dir=ddir, state_dir=state_dir, admins=admin or [], developers=developer or [],
                      dummy_auth=dummy_auth)  # fmt: skip
    typer.echo(f"JupyterHub on http://127.0.0.1:{port} (bkg at /services/bkg/, data dir {Path(ddir).resolve()})")
    hub.run(command, env, Path.cwd())


def _state_dir(path: Path, make: bool = True) -> None:
    """Make the Hub's state dir, or refuse one that cannot be, naming it (`make=False`: only refuse one a file is
    in the way of, itself or a folder above it)."""
    try:
        if make:
            path.mkdir(parents=True, exist_ok=True)
        else:  # the nearest thing there is (a link to nothing counts) must be a folder this user may make in
            there = next(p for p in (path.absolute(), *path.absolute().parents) if p.exists() or p.is_symlink())
            if not there.is_dir():
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(there))
            if there != path.absolute() and not os.access(there, os.W_OK | os.X_OK):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(there))
    except OSError as exc:
        why = exc.strerror or type(exc).__name__
        if isinstance(exc, (FileExistsError, NotADirectoryError)):
            why = "a file is in the way of the folder"
        raise InvalidInput(f"cannot use {path} as the Hub's state dir: {why} (pass --state-dir)",
                           field="state_dir") from None  # fmt: skip


@app.command("run")
def run_all(
    port: LabPort = 8888,
    data_dir: DataDir = None,
    dashboards_port: DashboardsPort = 8866,
    admin: Annotated[
        bool,
        typer.Option("--admin", help="Give the lab and its kernels the admin key (default: the workbench key)."),
    ] = False,
) -> None:
    """Run the workbench: the gateway in the background (started if none runs), the Voila dashboards, and
    JupyterLab (with the bkg extension) in front.

    The lab and its kernels hold the workbench key (data_dir/workbench.key: the admin user's, with the developer
    role's scopes, listed and revocable), or BKG_API_KEY when set, not the admin key, unless `--admin` asks for it;
    Voila holds no key, and every dashboard asks for its own login."""
    import signal

    from bkg_kernel.client import connect
    from bkg_kernel.client.keeper import GatewayKeeper
    from bkg_kernel.client.workbench import SPAWNED, running_gateway, vet_gateway
    from bkg_kernel.settings import Settings, gateway_url

    settings = Settings() if data_dir is None else Settings(data_dir=data_dir)
    if admin and settings.api_key:  # connect() sends BKG_API_KEY: --admin would be ignored without a word
        raise InvalidInput("--admin gives the lab the admin key, but BKG_API_KEY is set and would be used instead: "
                           "unset BKG_API_KEY, or leave out --admin", field="admin")  # fmt: skip
    ddir = settings.data_dir.resolve()
    running = running_gateway(ddir)
    # the URL connect() takes: a host in ./bkg.toml (a cloned repo's) does not get the key, nor the lab's traffic
    vet_gateway(running or gateway_url(settings), settings)
    # before anything starts: Voila's answer to a folder that is not there was a traceback, after the gateway came up
    _folder(Path("notebooks"), "notebooks", "run this in the bkg checkout (bkg run opens its notebooks/)")
    _folder(settings.dashboards_dir, "dashboards", "run this in the bkg checkout, or set BKG_DASHBOARDS_DIR")
    if port and port == dashboards_port:
        raise InvalidInput(f"--port and --dashboards-port are both {port}: give the lab and Voila a port each",
                           field="dashboards_port")  # fmt: skip
    _port_free(port, "--port")
    _port_free(dashboards_port, "--dashboards-port")
    # the data dir's running gateway, else one connect() starts (the data dir's key goes to no other)
    wb = connect(running, data_dir=ddir, admin=admin)
    started = None if running else _started_gateway(ddir, wb.url)
    keeper = None
    if started is not None and (spawned := SPAWNED.get(started)) is not None:  # it starts this gateway again if it dies
        keeper = GatewayKeeper(spawned, settings, ddir, wb.url, lambda line: typer.echo(line, err=True)).start()
    children: list[subprocess.Popen[bytes]] = []
    starting = {"now": False, "stop": False}

    # SIGTERM (a service manager, `timeout`) stops everything this command started, like Ctrl-C does
    def on_term(*_: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM (the process group) must not cut cleanup
        if starting["now"]:  # a server forked but not yet in `children`: it would outlive this command
            starting["stop"] = True
            return
        sys.exit(0)

    def start(cmd: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        """Start a server and hold it in `children` before a SIGTERM may end this command (then it stops)."""
        starting["now"] = True
        try:
            children.append(subprocess.Popen(cmd, stdin=subprocess.DEVNULL, env=env))
        finally:
            starting["now"] = False
        if starting["stop"]:
            sys.exit(0)
        return children[-1]

    signal.signal(signal.SIGTERM, on_term)
    try:  # from here on, whatever fails stops the gateway connect() started
        typer.echo(f"bkg gateway: {wb.url}  (plugins: {', '.join(p['id'] for p in wb.plugins)})", err=True)
        me = wb.me()  # who the key is, as the gateway says: BKG_API_KEY, when set, is what the lab gets
        rights = "admin" if any(str(s).startswith("admin:") for s in me.get("scopes") or ()) else "no admin"
        typer.echo(f"the lab and its kernels act as {me.get('username')!r} with {rights} rights "
                   f"({_key_source(settings, admin)}); the dashboards ask for a login", err=True)  # fmt: skip
        if (ddir / "admin.key").exists():
            typer.echo(f"admin API key file: {ddir / 'admin.key'}", err=True)
        dashboards_url = f"http://127.0.0.1:{dashboards_port}"
        start(dashboards_cmd(dashboards_port, settings.dashboards_dir), dashboards_env(wb.url))
        typer.echo(f"dashboards: {dashboards_url}/ (log in with an API key)", err=True)
        # the lab extension's server side forwards to this gateway with this key (the browser never holds it)
        env = lab_env(wb.url, wb.api_key, dashboards_url, settings.dashboards_dir.resolve())
        start(lab_cmd(port, Path("notebooks"), False), env).wait()
    except KeyboardInterrupt:
        pass
    finally:
        kept = keeper.stop() if keeper is not None else started  # no restart from here on: the one now running
        for child in children:
            child.terminate()
        for child in children:
            try:
                child.wait(20)
            except subprocess.TimeoutExpired:
                child.kill()
        if kept is not None and _started_gateway(ddir, wb.url) == kept:  # still that one: not a later one's
            os.kill(kept, signal.SIGTERM)
            typer.echo("bkg gateway stopped", err=True)


def _started_gateway(ddir: Path, url: str) -> int | None:
    """The pid of the data dir's running gateway when it serves `url` (the one `bkg run` had connect() start)."""
    from bkg_kernel.client.workbench import running_gateway

    if running_gateway(ddir) != url.rstrip("/"):
        return None
    try:
        return int(json.loads((ddir / "gateway.json").read_text())["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _key_source(settings: Any, admin: bool) -> str:
    """Where the key `connect()` sends came from, in words (BKG_API_KEY first, as `connect()` takes it)."""
    if settings.api_key:
        return "BKG_API_KEY"
    if settings.hub_user and settings.hub_api_token and not admin:
        return "your JupyterHub token"
    return "the admin key" if admin else "the workbench key"


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
    with _store(data_dir, made=False) as s:
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
    yes: Yes = False,
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
    yes: Yes = False,
    data_dir: DataDir = None,
) -> None:
    """Restore a snapshot into the same collection (replacing it, after asking, as drop does) or a new one."""
    if into is None and not yes:
        typer.confirm(f"Replace collection {name!r} with snapshot {snapshot_id!r}? (--into NAME keeps it)", abort=True)
    with _store(data_dir, made=False) as s:
        coll = s.restore_snapshot(name, snapshot_id, into)
        _print(s.describe(coll.name))


@store_app.command("delete-snapshot")
def store_delete_snapshot(
    name: str,
    snapshot_id: str,
    yes: Yes = False,
    data_dir: DataDir = None,
) -> None:
    """Delete one snapshot archive (after asking)."""
    if not yes:
        typer.confirm(f"Delete snapshot {snapshot_id!r} of {name!r}?", abort=True)
    with _store(data_dir) as s:
        s.delete_snapshot(name, snapshot_id)
    typer.echo(f"deleted {snapshot_id}")


def _models(model_dir: Path | None, *, made: bool = True) -> Any:
    """The registry of the model dir, which reading commands never create (`made`: it must be there)."""
    from bkg_kernel.errors import NotFound
    from bkg_kernel.models.registry import ModelRegistry
    from bkg_kernel.settings import get_settings

    folder = Path(model_dir if model_dir is not None else get_settings().model_dir)
    _model_dir_usable(folder, given=model_dir is not None)
    reg = ModelRegistry(folder, register_defaults=False)
    if made and not reg.dir.is_dir():
        raise NotFound(
            f"no model dir at {reg.dir}: the gateway makes it at its first start, with the packaged default models "
            "registered (so does `bkg models add`); --model-dir or BKG_MODEL_DIR names another",
            field="model_dir",
        )
    return reg


def _model_dir_usable(folder: Path, given: bool) -> None:
    """Refuse a model dir that is not a folder, naming it: a file (the error blamed `<file>/manifest.json`), a link
    to nothing (`add` made the folder it links to, wherever that was), or a path with a file in the way above it. A
    missing one is not refused here: `add` makes it, the other commands say it is not there. (`given`: named by
    --model-dir; else by the settings.)"""
    where = folder.absolute()
    try:
        if where.is_dir():
            return
        # itself, else the nearest thing above it that is there (what is in the way of a folder made in it)
        there = next((p for p in (where, *where.parents) if p.exists() or p.is_symlink()), None)
        if there is None or there.is_dir():
            return
        if not there.exists():
            what = f"a link to {os.readlink(there)}, which is not there"
        else:
            what = "a file" if there.is_file() else "not a folder"
    except OSError:  # not ours to look at (a folder above it this user may not enter): the registry says so
        return
    said = f"{where} is {what}" if there == where else f"{there} is {what}, in the way of the folder {where}"
    source = "" if given else " (BKG_MODEL_DIR or bkg.toml's model_dir; --model-dir names another)"
    raise InvalidInput(f"{said}: the model dir must be a folder{source}", field="--model-dir" if given else "model_dir")


@models_app.command("list")
def models_list(
    model_dir: ModelDir = None, kind: Annotated[str | None, typer.Option(help="Only this kind.")] = None
) -> None:
    """List registered models (the packaged defaults are registered at the gateway's first start)."""
    for m in _models(model_dir).list(kind):
        typer.echo(f"{m.id:<28} {m.kind:<16} {m.size / 2**20:>9,.1f} MB  {m.license or '-':<12} {m.source}")


@models_app.command("add")
def models_add(
    path: Path,
    id: Annotated[str | None, typer.Option("--id", help="Model id (default: the file name).")] = None,
    kind: Annotated[
        str | None,
        typer.Option(help="gguf-llm, gguf-embedding, hf-transformers, onnx, face-pack, torch-program, classifier."),
    ] = None,
    license: Annotated[str | None, typer.Option(help="License name.")] = None,
    import_mode: Annotated[
        str | None, typer.Option("--import", help="copy or link a path that is outside the model dir.")
    ] = None,
    model_dir: ModelDir = None,
) -> None:
    """Register a model file or folder (checked: a file that is not what its kind says is refused); a new model dir
    also gets the packaged default models."""
    reg = _models(model_dir, made=False)
    entry = reg.add(path, id=id, kind=kind, license=license, import_mode=import_mode)
    reg.ensure_defaults()  # put in once: a model dir this makes is the one the gateway would have made
    _print(entry.model_dump())


@models_app.command("verify")
def models_verify(
    model_id: Annotated[str | None, typer.Argument(help="One model (default: all).")] = None, model_dir: ModelDir = None
) -> None:
    """Recompute sha256 and report drift; exit 1 if any model drifted or is missing."""
    reg = _models(model_dir)
    ids = [model_id] if model_id else [m.id for m in reg.list()]
    bad = 0
    for mid in ids:
        r = reg.verify(mid)
        bad += not r["ok"]
        state = "ok" if r["ok"] else ("MISSING" if r["missing"] else "DRIFT")
        typer.echo(f"{mid:<28} {state}  {r['path']}")
    if bad:
        raise typer.Exit(1)


@models_app.command("remove")
def models_remove(
    model_id: str,
    delete_files: Annotated[
        bool, typer.Option("--delete-files", help="Also delete its file from the model dir.")
    ] = False,
    model_dir: ModelDir = None,
) -> None:
    """Unregister a model."""
    _print(_models(model_dir).remove(model_id, delete_files=delete_files).model_dump())


# A command's option sent as a request field of another name (field -> the option's parameter); every other field
# is named as the parameter of the same name is (`query.limit`: --limit, `expires_in_days`: --expires-in-days)
SENT_AS: dict[Callable[..., Any], dict[str, str]] = {
    keys_create: {"user_id": "user", "scopes": "scope", "rate_limit_per_min": "rate_limit"},
    jobs_cli.run: {"timeout_s": "timeout"},
    jobs_cli.schedule: {"timeout_s": "timeout", "timezone": "tz", "webhook_url": "webhook"},
}


def as_typed(exc: BkgError, ctx: Any, sent_as: Mapping[str, str]) -> None:
    """Name in `exc` the option the user typed where it names the request field the option was sent as (`query.limit`
    is the HTTP API's name; at the CLI it is `--limit`; `scopes.0` is `--scope 'x'`). A field no option of the
    command sends, a positional argument's, or an option left unset (its setting decides: `--data-dir`) stays."""
    field = exc.field
    if not isinstance(field, str) or not field:  # none, or not a bkg gateway's (a server at --url of another kind)
        return
    head, _, rest = field.removeprefix("query.").partition(".")
    name = sent_as.get(head, head)
    param = next((p for p in ctx.command.params if p.name == name and isinstance(p, TyperOption)), None)
    value = ctx.params.get(name)
    if param is None or value is None:
        return
    label = next((o for o in param.opts if o.startswith("--")), param.opts[0])
    index, _, inner = rest.partition(".")
    if index.isdigit() and isinstance(value, list | tuple) and int(index) < len(value):  # one of a repeated option
        label, rest = f"{label} {value[int(index)]!r}", inner
    if rest:
        label = f"{label} ({rest})"
    if exc.message.startswith(field) and exc.message[len(field) : len(field) + 1] in ("", ":", " "):  # said first
        exc.message = label + exc.message[len(field) :]
    exc.field = label


class OptionsNamed(TyperCommand):
    """A command whose errors from the gateway name its options as the user typed them (`as_typed`): one that
    talks to a gateway (it takes --url). (The store and models commands run here, and their errors name the
    library's arguments.)"""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except BkgError as exc:
            if not any(p.name == "url" for p in self.params):
                raise
            command = getattr(self.callback, "__wrapped__", self.callback)  # under typer's wrapper: the function
            as_typed(exc, ctx, SENT_AS.get(command, {}) if command is not None else {})
            raise


def _options_named(typer_app: typer.Typer) -> None:
    """Make every command of `typer_app` (and of its groups) an `OptionsNamed`."""
    for info in typer_app.registered_commands:
        if info.cls in (None, TyperCommand):  # typer's own (a command of another class keeps it)
            info.cls = OptionsNamed
    for group in typer_app.registered_groups:
        if group.typer_instance is not None:
            _options_named(group.typer_instance)


_options_named(app)


def main() -> None:
    """Run the CLI; a BkgError prints one clear line and exits 2 instead of a traceback."""
    import tomllib

    from pydantic import ValidationError

    try:
        app()
    except BkgError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise SystemExit(2) from None
    except ValidationError as exc:  # a setting (BKG_*, bkg.toml, a flag such as --port) that cannot be used
        for e in exc.errors(include_url=False):
            where = ".".join(str(p) for p in e["loc"]) or exc.title
            if exc.title == "Settings" and len(e["loc"]) == 1:  # named by a flag, BKG_<NAME> or a bkg.toml key
                where = f"{where} (BKG_{where.upper()})"
            got = f" (got {e['input']!r})" if not isinstance(e.get("input"), dict) else ""
            typer.echo(f"error: {where}: {e['msg']}{got}", err=True)
        raise SystemExit(2) from None
    except tomllib.TOMLDecodeError as exc:
        typer.echo(f"error: bkg.toml (or BKG_CONFIG's file) is not valid TOML: {exc}", err=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
