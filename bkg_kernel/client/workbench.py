"""The notebook client: `wb = bkg.connect()` finds (or starts) the gateway and mirrors its REST API."""

from __future__ import annotations

import fcntl
import ipaddress
import json
import os
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from tqdm.auto import tqdm

from bkg_kernel.client import transport
from bkg_kernel.client.brain import Brain
from bkg_kernel.client.callport import HELLO, RETRY_AFTER_S, CallPort
from bkg_kernel.client.collections import RemoteCollection
from bkg_kernel.client.faces import Faces
from bkg_kernel.client.jobs import Jobs, said_goes_on
from bkg_kernel.client.llm import LLM, ModelTable
from bkg_kernel.client.plugins import PluginTable, RemotePlugin, checked_plugin_id
from bkg_kernel.client.repo import Repo
from bkg_kernel.display import Table
from bkg_kernel.errors import BkgError, Forbidden, InvalidInput, JobFailed, Timeout, Unavailable
from bkg_kernel.logfiles import open_log
from bkg_kernel.settings import Settings, folder_named, from_cwd_config, gateway_url
from bkg_kernel.store.lock import make_data_dir
from bkg_kernel.store.results import CollectionInfo, CollectionList

_latest: weakref.ref[Workbench] | None = None


class _Workspaces(Table):
    """repoagent's workspaces."""

    columns = ("name", "path", "git", "added_by", "collection")
    caption = "repoagent workspaces"


class UserTable(Table):
    """Users with their role and state (never a password hash: the gateway sends none)."""

    headers = ("username", "role", "state", "password", "created", "id")
    noun = "user"

    def cells(self, row: dict[str, Any]) -> Sequence[Any]:
        """Return one user's cells."""
        state = "disabled" if row.get("disabled") else "active"
        return (row["username"], row["role"], state, "set" if row.get("has_password") else "none",
                row.get("created_at"), row["id"])  # fmt: skip


class KeyTable(Table):
    """API keys with their owner, scopes and state (never a secret: the gateway sends none)."""

    headers = ("name", "prefix", "user id", "state", "scopes", "expires", "last used", "id")
    noun = "key"

    def cells(self, row: dict[str, Any]) -> Sequence[Any]:
        """Return one key's cells."""
        scopes = ", ".join(row.get("scopes") or ()) + (" (its role's)" if row.get("follows_role") else "")
        return (row["name"], row["prefix"], row["user_id"], row["state"], scopes, row.get("expires_at") or "never",
                row.get("last_used_at"), row["id"])  # fmt: skip


class AuditTable(Table):
    """Audit entries, newest first."""

    headers = ("when", "actor", "action", "target", "ok", "detail")
    noun, nouns = "audit entry", "audit entries"

    def cells(self, row: dict[str, Any]) -> Sequence[Any]:
        """Return one entry's cells."""
        return (row["created_at"], row["actor"], row["action"], row["target"], row["ok"], row.get("detail") or "")


def latest() -> Workbench | None:
    """The Workbench made last in this process, while it lives."""
    return _latest() if _latest is not None else None


CALL_TIMEOUT_S = 120.0  # how long one call waits for the gateway's answer, unless `connect(call_timeout=...)`


class Workbench:
    """A connected gateway: plugins, collections and admin, with notebook reprs. `timeout` is how long one call
    waits for the gateway's answer (`connect(call_timeout=...)`): a call that outlives it is a 504 `Timeout`."""

    def __init__(
        self, url: str, api_key: str | None, timeout: float = CALL_TIMEOUT_S, *, call_port: bool = True
    ) -> None:
        global _latest
        _latest = weakref.ref(self)  # what `%%chat` uses: the notebook's own connection
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = transport.Http(self.url, headers, timeout)
        # plugin calls over the gateway's call port: only with a bkg key or session (a Hub token goes to the Hub's
        # bkg service over HTTP, nowhere else), and only to a gateway served at its own address in plain HTTP (no
        # path prefix; not HTTPS: the port has no TLS, and the key must not cross a network in clear text)
        parts = urlsplit(self.url)
        bkg_key = bool(api_key and api_key.startswith(("bkg_", "bkgs_")))
        self._use_port = call_port and bkg_key and parts.scheme == "http" and not parts.path
        self._port: CallPort | None = None
        self._port_checked = 0.0
        self._port_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Workbench({self.url!r})"

    def call(self, method: str, path: str, **kw: Any) -> Any:
        """Send one request; a 4xx / 5xx raises the BkgError the gateway's JSON error names."""
        return transport.request(self.http, method, path, **kw)

    def invoke(self, plugin_id: str, capability: str, body: Any) -> Any:
        """Run one plugin capability with its JSON input and return its result: over the gateway's call port when
        it has one (no HTTP between the call and the plugin), else over HTTP; the same errors either way."""
        checked_plugin_id(plugin_id)  # as a path segment, '../admin' would reach another route
        port = self.call_port()
        if port is not None:
            answer = port.call(plugin_id, capability, transport.dumps(body))
            if answer is not None and not transport.misdirected(*answer[:2]):  # a job's call: started over HTTP
                return transport.answer(*answer)
        path = f"/api/plugins/{transport.seg(plugin_id)}/invoke/{transport.seg(capability)}"
        return self.call("POST", path, json=body)

    def call_port(self) -> CallPort | None:
        """The gateway's call port as /health names it (None: none, or not for this client); looked up again
        once it could not be reached (a gateway started anew has another), at most every 30 s."""
        port = self._port
        if not self._use_port:
            return None
        if port is not None and (port.refused or not port.stale):  # refused for good, or full for a while: None
            return port if port.usable() else None
        with self._port_lock:
            if self._port is not port:  # another thread looked meanwhile
                return self._port if self._port is not None and self._port.usable() else None
            if self._port_checked and time.monotonic() - self._port_checked < RETRY_AFTER_S:
                return None
            self._port_checked = time.monotonic()
            try:
                found = self.health().get("call_port")
            except BkgError:
                found = None
            if port is not None:
                port.close()
            self._port = None
            if isinstance(found, dict) and found.get("protocol") == HELLO:
                host = urlsplit(self.url).hostname or "127.0.0.1"
                assert self.api_key is not None
                self._port = CallPort(host, int(found["port"]), self.api_key, self.timeout, int(found["max_input"]))
            return self._port

    def health(self) -> dict[str, Any]:
        """Return /health."""
        return self.call("GET", "/health")

    def me(self) -> dict[str, Any]:
        """Return who this client is and its scopes."""
        return self.call("GET", "/auth/me")

    # -- plugins ----------------------------------------------------------------------------------
    @property
    def plugins(self) -> PluginTable:
        """Every plugin with status and telemetry (a table in a notebook)."""
        return PluginTable(self.call("GET", "/api/plugins")["plugins"])

    def plugin(self, plugin_id: str) -> RemotePlugin:
        """Return a handle on one plugin."""
        return RemotePlugin(self, plugin_id)

    # -- models and the LLM -------------------------------------------------------------------------
    @property
    def llm(self) -> LLM:
        """Chat, completion and embeddings through llmserver (`wb.llm.chat("...")` streams into the output)."""
        return LLM(self)

    @property
    def brain(self) -> Brain:
        """brainml: index, query (a ranked table with highlights), ask, stats."""
        return Brain(self)

    def repo(self, name: str) -> Repo:
        """repoagent: one workspace (tree, read, search, symbols, map, ask, document, run, commit)."""
        return Repo(self, name)

    def repos(self) -> Table:
        """Every repoagent workspace with its index status (a table in a notebook)."""
        body = {"action": "list"}
        return _Workspaces(self.invoke("repoagent", "repo.workspace", body)["workspaces"])

    def repo_roots(self) -> list[str]:
        """The folders repoagent workspaces may live under (its `repo_roots` setting)."""
        body = {"action": "list"}
        return list(self.invoke("repoagent", "repo.workspace", body)["roots"])

    def add_repo(self, name: str, path: str) -> Repo:
        """Register a folder under a repo root as a workspace and return it."""
        body = {"action": "add", "name": name, "path": path}
        self.invoke("repoagent", "repo.workspace", body)
        return Repo(self, name)

    @property
    def faces(self) -> Faces:
        """rustyface: detect, verify, galleries, enroll_folder (with a progress bar)."""
        return Faces(self)

    @property
    def models(self) -> ModelTable:
        """Registered models (a table in a notebook)."""
        return ModelTable(self.call("GET", "/api/models")["models"])

    def add_model(self, path: str | os.PathLike[str], **opts: Any) -> dict[str, Any]:
        """Register a model file or folder (`import_mode="copy"|"link"` for one outside the model dir); a relative
        path is this notebook's, made absolute here (the gateway refuses one: its working directory is not ours)."""
        where = os.fspath(path)
        if where and not os.path.isabs(where) and not where.startswith("~") and os.path.lexists(where):
            where = os.path.abspath(where)
        return self.call("POST", "/api/models", json={"path": where, **opts})

    def verify_model(self, model_id: str) -> dict[str, Any]:
        """Recompute a model's sha256 and report drift."""
        return self.call("POST", f"/api/models/{transport.seg(model_id)}/verify")

    # -- collections ------------------------------------------------------------------------------
    def collections(self) -> CollectionList:
        """Describe every collection (a table in a notebook; `.names` lists them)."""
        return CollectionList([CollectionInfo(**c) for c in self.call("GET", "/api/collections")["collections"]])

    def create_collection(
        self,
        name: str,
        dim: int,
        metric: str = "cosine",
        index: str = "flat",
        *,
        embed_model: str | None = None,
        **params: int,
    ) -> RemoteCollection:
        """Create a collection on the gateway (`embed_model="candle:all-minilm-l6-v2"` embeds texts for you)."""
        body = {
            "name": name, "dim": dim, "metric": metric, "index": index, "params": params, "embed_model": embed_model,
        }  # fmt: skip
        self.call("POST", "/api/collections", json=body)
        return RemoteCollection(self, name)

    def collection(self, name: str) -> RemoteCollection:
        """Return a handle on one collection."""
        return RemoteCollection(self, name)

    def drop_collection(self, name: str) -> None:
        """Drop a collection (its snapshots stay)."""
        self.call("DELETE", f"/api/collections/{transport.seg(name)}")

    # -- admin ------------------------------------------------------------------------------------
    def users(self) -> UserTable:
        """List users (a table in a notebook)."""
        return UserTable(self.call("GET", "/admin/users")["users"])

    def create_user(self, username: str, role: str = "viewer", password: str | None = None) -> dict[str, Any]:
        """Create a user."""
        return self.call("POST", "/admin/users", json={"username": username, "role": role, "password": password})

    def keys(self) -> KeyTable:
        """List API keys (no secrets; a table in a notebook)."""
        return KeyTable(self.call("GET", "/admin/keys")["keys"])

    def create_key(self, name: str, **kw: Any) -> dict[str, Any]:
        """Create a key; the returned `key` is the secret, shown once."""
        return self.call("POST", "/admin/keys", json={"name": name, **kw})

    def audit(self, limit: int = 100) -> AuditTable:
        """Recent audit entries, newest first (a table in a notebook)."""
        return AuditTable(self.call("GET", "/admin/audit", params={"limit": limit})["entries"])

    # -- background jobs ------------------------------------------------------------------------------
    @property
    def jobs(self) -> Jobs:
        """Notebook jobs: `wb.jobs.run(notebook, **parameters)`, `.list()`, `.schedule(...)`; `wb.jobs()` lists
        every job (notebook runs, downloads, training), newest first."""
        return Jobs(self)

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        """Cancel a running plugin job."""
        return dict(self.call("POST", f"/api/jobs/{transport.seg(job_id)}/cancel"))

    def wait_job(self, job_id: str, *, progress: bool = True, timeout: float | None = None) -> dict[str, Any]:
        """Wait for a job with a progress bar; return its result, or raise its error as a BkgError. A notebook run
        (`run-...`) is waited for as `wb.jobs.wait` does: its record (state, cells, output) is its result. Interrupting
        the wait stops only the waiting: the job goes on in the gateway (the message says how to cancel it)."""
        if job_id.startswith("run-"):  # what /api/jobs/{id} answers with a run's record (it has no `result`)
            run = self.jobs.wait(job_id, progress=progress, timeout=timeout)
            if not run.ok:
                err = run.get("error") or {}
                where = f" at cell {err['cell_index']}" if err.get("cell_index") is not None else ""
                why = f": {err.get('ename')}: {err.get('evalue')}" if err else ""
                msg = f"run {run['id']} ({run.get('notebook')}) {run['state']}{where}{why}"
                raise JobFailed(msg, state=run["state"], field="job_id")
            return dict(run)
        deadline = None if timeout is None else time.monotonic() + timeout
        bar = tqdm(total=100, desc=job_id, unit="%", disable=not progress, leave=False)
        try:
            while True:
                job = self.call("GET", f"/api/jobs/{transport.seg(job_id)}")
                bar.n = round(100 * job["progress"])
                bar.set_postfix_str(job["message"][:60], refresh=True)
                if job["finished"] is not None:
                    break
                if deadline is not None and time.monotonic() > deadline:
                    raise Timeout(f"job {job_id} still {job['state']} after {timeout:g}s", field="job_id")
                time.sleep(0.2)
        except KeyboardInterrupt:
            said_goes_on(f"job {job_id}", f"wb.cancel_job({job_id!r})")
            raise
        finally:
            bar.close()
        if job["state"] not in ("done", "succeeded"):
            msg = f"job {job_id} ({job['kind']}) {job['state']}: {job['error']}"
            raise JobFailed(msg, state=job["state"], field="job_id")
        return dict(job["result"] or {})


def _api_key(settings: Settings, data_dir: Path, admin: bool = False) -> str | None:
    """The key a client sends: `api_key` (BKG_API_KEY) when set; else the data dir's workbench key (developer
    scopes), or, only when a person asked for it (`admin=True`: the bkg CLI's admin commands, `bkg run --admin`),
    its admin key."""
    if settings.api_key:
        return sendable_key(settings.api_key, "BKG_API_KEY")
    if settings.hub_user and settings.hub_api_token and not admin:
        return settings.hub_api_token  # a Hub user's server and its kernels act as that user
    path = data_dir / ("admin.key" if admin else "workbench.key")
    try:
        text = path.read_bytes().decode("utf-8").strip()
    except OSError:  # missing (or unreadable): the gateway's 401 says so, with `missing_key`'s words
        return settings.admin_key if admin else None
    except UnicodeError:
        raise InvalidInput(f"api_key ({path}): not an API key: it is not UTF-8 text; {_key_fix(path)}",
                           field="api_key") from None  # fmt: skip
    return sendable_key(text, str(path), _key_fix(path)) if text else None


def _key_fix(path: Path) -> str:
    """How a key file of the data dir is written again."""
    if path.name == "admin.key":
        return "`bkg keys recover-admin` (with the gateway stopped) writes a new one, or set BKG_API_KEY"
    return "a gateway started on the data dir writes a new one (`bkg serve`), or set BKG_API_KEY"


def missing_key(data_dir: Path, admin: bool = False) -> str:
    """What a client with no key to send says when the gateway asks for one: the key file it found missing."""
    path = data_dir / ("admin.key" if admin else "workbench.key")
    return f"no API key to send: {path} is missing or unreadable; {_key_fix(path)}"


def sendable_key(key: str, where: str, fix: str = "") -> str:
    """Refuse a key that cannot be sent in an HTTP header (text that is not printable ASCII, which a bkg key always
    is), naming `where` it came from (BKG_API_KEY, a key file), rather than failing deep in the request."""
    if not (key.isascii() and key.isprintable()):
        then = f"; {fix}" if fix else ""
        raise InvalidInput(f"api_key ({where}): not an API key: a key is printable ASCII text (bkg_...){then}",
                           field="api_key")  # fmt: skip
    return key


def is_gateway(url: str) -> None:
    """Refuse (503 `Unavailable`, one line at the CLI) an address whose `/health` is not a bkg gateway's: another
    server answering on the port, which `--url` or BKG_GATEWAY_URL named."""
    try:
        health = httpx.get(f"{url}/health", timeout=5.0).json()
        ok = isinstance(health, dict) and {"status", "version", "plugins"} <= health.keys()
    except (httpx.HTTPError, ValueError):
        ok = False
    if not ok:
        raise Unavailable(f"{url} did not answer as a bkg gateway does: is it one? (--url, BKG_GATEWAY_URL)")


def _health(url: str) -> int | None:
    """The HTTP status `url`'s /health answers with (200: a gateway), None when nothing answers there."""
    try:
        return httpx.get(f"{url}/health", timeout=2.0).status_code
    except httpx.HTTPError:
        return None


def connect(
    url: str | None = None,
    *,
    api_key: str | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    start: bool = True,
    timeout: float = 60.0,
    admin: bool = False,
    call_timeout: float = CALL_TIMEOUT_S,
) -> Workbench:
    """Connect to the gateway of this data dir, starting one in the background when none runs.

    Two waits: `timeout` is how long to wait for a gateway this call starts to answer (60 s); `call_timeout` is how
    long each later call waits for the gateway's answer (120 s) before it raises `Timeout` (504), the gateway still
    at work. A gateway is only started on this machine (a URL of `localhost`, 127.0.0.1, ::1 or 0.0.0.0): one
    elsewhere that does not answer is a 503 `Unavailable`, as is any when `start=False`.

    The key: `api_key`, else BKG_API_KEY, else (in a JupyterHub user's server and its kernels) the user's Hub
    token, else the data dir's workbench key (developer scopes); `admin=True` (a person asking for admin rights)
    reads admin.key instead. The gateway: `url`, else the one the settings find, which `vet_gateway` checks first
    (a `bkg.toml` in the working directory alone cannot send the key elsewhere). A key of the data dir's own goes,
    unless `url` or BKG_GATEWAY_URL names a gateway, only to the gateway that holds the data dir's lock or to the
    one this call starts; with none running and `start=False` that is a 503 `Unavailable`."""
    folder_named(data_dir, "data_dir")  # Path("") is the working directory
    settings = Settings() if data_dir is None else Settings(data_dir=Path(data_dir))
    ddir = settings.data_dir.resolve()
    under_hub = bool(settings.hub_user and settings.hub_api_token)
    key = api_key or settings.api_key
    if key:
        key = sendable_key(key, "the argument" if api_key else "BKG_API_KEY")
    found = not url
    if under_hub and not key and not admin:
        key = settings.hub_api_token
        url = hub_gateway(settings, url)  # the Hub token goes only to the Hub's own bkg service
        found = False
    url = url or gateway_url(settings)
    if not transport.is_http_url(url):
        raise InvalidInput(
            f"url (--url, BKG_GATEWAY_URL): the gateway URL must look like http://host:port, not {url!r}", field="url"
        )
    if found:
        vet_gateway(url, settings)  # before anything goes there, /health included
        running = running_gateway(ddir)
        if not settings.gateway_url and url != running:
            # a gateway.json no gateway holds (one killed outright leaves it) names a port that may be anybody's
            # now (one taken with BKG_PORT=0 above all): the settings' address, as if no file were there
            url = f"http://{settings.host}:{settings.port}"
        if not settings.gateway_url and not key and running is None:
            # the key will be the data dir's own (workbench.key, admin.key): it goes to the gateway the data dir's
            # lock vouches for, or to one started here, never to whatever answers on host:port (anyone may bind
            # 127.0.0.1:43119 while the gateway is down)
            if not start or under_hub or not _this_machine(urlsplit(url).hostname or ""):
                raise Unavailable(f"no bkg gateway answers for data dir {ddir} (none runs on it): start one with "
                                  "`bkg serve`")  # fmt: skip
            url = spawn_gateway(settings, ddir, url, timeout)
            return _keyed(Workbench(url, _api_key(settings, ddir, admin), call_timeout), ddir, admin)
    status = _health(url)
    if status != 200:
        # a Hub user's server never starts a gateway of its own, and none is started for another machine's URL
        # (it could not bind there; the data dir it would make here is not that gateway's)
        if not start or under_hub or not _this_machine(urlsplit(url).hostname or ""):
            if status in (502, 503, 504):  # a proxy in front (the Hub's, nginx) whose gateway is down
                raise Unavailable(f"no bkg gateway answers at {url} (HTTP {status} from the server in front of it)")
            if status is not None:  # another server there (a 404 from it read as "no gateway answers")
                raise Unavailable(f"{url} answers, but not as a bkg gateway (GET /health: HTTP {status}): is the "
                                  "URL right? (`bkg serve` starts a gateway)")  # fmt: skip
            raise Unavailable(f"no bkg gateway answers at {url} (start one with `bkg serve`)")
        url = spawn_gateway(settings, ddir, url, timeout)
    if key:
        return Workbench(url, key, call_timeout)
    # the data dir's key exists once it started
    return _keyed(Workbench(url, _api_key(settings, ddir, admin), call_timeout), ddir, admin)


def _keyed(wb: Workbench, ddir: Path, admin: bool) -> Workbench:
    """`wb`, which was to send the data dir's key file's key: with none there, a 401 names the missing file."""
    if wb.api_key is None:
        wb.http.no_key = missing_key(ddir, admin)
    return wb


def vet_gateway(url: str, settings: Settings) -> None:
    """Refuse a gateway URL the settings found when only the working directory chose it.

    A `bkg.toml` in the working directory may be a cloned repository's, and so may a `data/gateway.json` there;
    the key a client sends (BKG_API_KEY, the data dir's key files, an `api_key` argument) is the user's. A found
    URL is trusted when one of these holds:

    * it is this machine's by its address: `localhost`, 127.0.0.1, ::1, or 0.0.0.0 / :: (which connect here);
      the default gateway URL is one of them too, so a file naming such a URL gains nothing;
    * the data dir's running gateway recorded it: its gateway.json names it while a process holds the data dir's
      lock (a lock file that is a link does not count);
    * the user's own settings name it: BKG_GATEWAY_URL, BKG_HOST with BKG_PORT, or a file named by an absolute
      BKG_CONFIG; not a bkg.toml read from the working directory, nor a gateway.json no gateway holds.

    A URL that was passed (`connect(url)`, the CLI's `--url`) is the caller's choice and is not vetted. Raise
    `Forbidden` naming the file that chose the URL, before anything is sent there."""
    url = url.rstrip("/")
    if _this_machine(urlsplit(url).hostname or ""):
        return
    ddir = settings.data_dir.resolve()
    state = ddir / "gateway.json"
    recorded = _recorded(state)
    running = recorded == url and _held(ddir / "bkg.lock")  # the lock is only tried when it decides
    found: list[tuple[str | None, Path | None, str]] = [  # (a URL the settings name, the file that alone chose it)
        ((settings.gateway_url or "").rstrip("/") or None, from_cwd_config(settings, "gateway_url"), "gateway_url"),
        (recorded, None if running else state, "no gateway holds its data dir"),
        (f"http://{settings.host}:{settings.port}", from_cwd_config(settings, "host", "port"), "host and port"),
    ]
    chosen = [(path, what) for named, path, what in found if named == url]
    if not chosen or any(path is None for path, _ in chosen):
        return  # not found by the settings (passed), or the user's own setting names it
    path, what = chosen[0]
    hint = "set BKG_HOST and BKG_PORT" if what == "host and port" else "set BKG_GATEWAY_URL"
    raise Forbidden(
        f"not sending your key to {url}: only {path} names it ({what}), and it is not this machine's gateway; "
        f"if you trust it, pass it (bkg.connect({url!r}), the CLI's --url) or {hint}"
    )


def _this_machine(host: str) -> bool:
    """Whether `host` is this machine's gateway address by its name alone: `localhost`, 127.0.0.1, ::1, or
    0.0.0.0 / :: (the addresses bkg serves on). Another loopback address (127.0.0.2) is not: a gateway there is
    named by the user or recorded by the gateway itself."""
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False  # a name: what it resolves to is the resolver's to say, now and at the next request
    return ip in (ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")) or ip.is_unspecified


def running_gateway(ddir: Path) -> str | None:
    """The URL the data dir's gateway recorded in its gateway.json, while that gateway runs (holds the data dir's
    lock); None when none runs."""
    recorded = _recorded(ddir / "gateway.json")
    return recorded if recorded is not None and _held(ddir / "bkg.lock") else None


def _recorded(state: Path, pid: int | None = None) -> str | None:
    """The URL a gateway.json records (as `gateway_url` reads it); with `pid`, only once the gateway `pid` wrote it
    (a stale one names another pid)."""
    try:
        data = json.loads(state.read_text())
        url = data["url"]
        if not (isinstance(url, str) and transport.is_http_url(url)):  # not a gateway's (`5`, `http://[::1`)
            return None
        return url.rstrip("/") if pid is None or data.get("pid") == pid else None
    except (ValueError, KeyError, TypeError, AttributeError, OSError):
        return None


def _held(lock: Path) -> bool:
    """Whether a process holds the data dir lock (`store.lock.DataDirLock`'s flock) of the file `lock` itself."""
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)  # a link to another data dir's lock: no
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # taken for an instant when free: closing the file drops it
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
    return False


def hub_gateway(settings: Settings, url: str | None = None) -> str:
    """Under JupyterHub: the bkg service's URL as the Hub's API gives it. The user's Hub token (which can reach
    their server) is sent nowhere else: a `gateway_url` from a cloned repo's bkg.toml cannot capture it."""
    found = _hub_service_url(settings.hub_api_url or "", settings.hub_api_token or "")
    if found is None:
        raise Unavailable("cannot find the bkg service through JupyterHub (the token needs read:services!service=bkg)")
    if url and url.rstrip("/") != found:
        raise Unavailable(f"not sending your Hub token to {url}: JupyterHub's bkg service is at {found} "
                          "(set BKG_API_KEY to use another gateway)")  # fmt: skip
    return found


def _hub_service_url(api_url: str, token: str, name: str = "bkg") -> str | None:
    """Under JupyterHub: the URL of the Hub's `bkg` service, from the Hub's API (the user's token needs
    read:services!service=bkg, which the shipped config gives)."""
    if not api_url or not token:
        return None
    try:
        r = httpx.get(f"{api_url.rstrip('/')}/services/{name}", headers={"Authorization": f"token {token}"}, timeout=5)
        url = r.json().get("url") if r.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None
    return str(url).rstrip("/") if url else None


# The gateways this process started, by pid: their exit codes are read here, not by whoever reaps them first.
SPAWNED: dict[int, subprocess.Popen[bytes]] = {}


def spawn_gateway(settings: Settings, ddir: Path, url: str, timeout: float) -> str:
    """Start `bkg serve` for `ddir` in a session of its own; return the URL it answers at, as its gateway.json names
    it: `url`, or with port 0 (BKG_PORT=0: any free port) the one it took. Never just whatever answers at `url`:
    another process there keeps this gateway from binding, and must not get the key meant for it."""
    make_data_dir(ddir)  # a file in its way, a folder not ours: one clear error naming it
    log = open_log(ddir / "gateway.log")  # handed to the child; rotated past 10 MB
    port = url.rsplit(":", 1)[-1].split("/")[0]
    host = url.split("//", 1)[-1].rsplit(":", 1)[0]
    proc = subprocess.Popen(
        [sys.executable, "-m", "bkg_kernel.cli", "serve", "--data-dir", str(ddir), "--host", host, "--port", port],
        stdout=log,
        stderr=log,
        stdin=subprocess.DEVNULL,
        start_new_session=True,  # outlives the notebook kernel, like `ollama serve`
    )
    SPAWNED[proc.pid] = proc  # `bkg run` learns how the gateway it started ended (and starts it again if it died)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        at = _recorded(ddir / "gateway.json", proc.pid)  # written once it holds the data dir and its port
        if at is not None and _health(at) == 200:
            return at
        if proc.poll() is not None:
            tail = (ddir / "gateway.log").read_text(errors="replace")[-800:]
            raise Unavailable(f"the bkg gateway exited (code {proc.returncode}) while starting:\n{tail}")
        time.sleep(0.1)
    raise Unavailable(f"the bkg gateway did not answer at {url} within {timeout:.0f}s (see {ddir / 'gateway.log'})")
