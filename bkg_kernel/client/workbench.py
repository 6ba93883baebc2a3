"""The notebook client: `wb = bkg.connect()` finds (or starts) the gateway and mirrors its REST API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
from tqdm.auto import tqdm

from bkg_kernel.errors import BkgError, Unavailable
from bkg_kernel.settings import Settings
from bkg_kernel.store.results import CollectionInfo, Hit, QueryResult, html_table

if TYPE_CHECKING:
    from bkg_kernel.brain_client import Brain
    from bkg_kernel.faces_client import Faces
    from bkg_kernel.llm_client import LLM, ModelTable


def raise_for_error(r: httpx.Response) -> None:
    """Raise the gateway's JSON error (status, code, message, field) as a BkgError."""
    try:
        err = r.json()["error"]
    except (ValueError, KeyError, TypeError):
        err = {"status": r.status_code, "code": "http_error", "message": r.text[:300]}
    exc = BkgError(err.get("message", ""), field=err.get("field"))
    exc.status, exc.code = int(err.get("status", r.status_code)), str(err.get("code", "http_error"))
    raise exc


class Workbench:
    """A connected gateway: plugins, collections and admin, with notebook reprs."""

    def __init__(self, url: str, api_key: str | None, timeout: float = 120.0) -> None:
        self.url = url.rstrip("/")
        self.api_key = api_key
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def __repr__(self) -> str:
        return f"Workbench({self.url!r})"

    def call(self, method: str, path: str, **kw: Any) -> Any:
        """Send one request; a 4xx / 5xx raises BkgError with the gateway's status, code, message and field."""
        try:
            r = self.http.request(method, path, **kw)
        except httpx.TransportError as exc:
            raise Unavailable(f"cannot reach the bkg gateway at {self.url}: {exc}") from None
        if r.status_code >= 400:
            raise_for_error(r)
        return r.json() if r.content and r.headers.get("content-type", "").startswith("application/json") else r.text

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
        from bkg_kernel.llm_client import LLM

        return LLM(self)

    @property
    def brain(self) -> Brain:
        """brainml: index, query (a ranked table with highlights), ask, stats."""
        from bkg_kernel.brain_client import Brain

        return Brain(self)

    @property
    def faces(self) -> Faces:
        """rustyface: detect, verify, galleries, enroll_folder (with a progress bar)."""
        from bkg_kernel.faces_client import Faces

        return Faces(self)

    @property
    def models(self) -> ModelTable:
        """Registered models (a table in a notebook)."""
        from bkg_kernel.llm_client import ModelTable

        return ModelTable(self.call("GET", "/api/models")["models"])

    def add_model(self, path: str, **opts: Any) -> dict[str, Any]:
        """Register a model file or folder (`import_mode="copy"|"link"` for one outside the model dir)."""
        return self.call("POST", "/api/models", json={"path": str(path), **opts})

    def verify_model(self, model_id: str) -> dict[str, Any]:
        """Recompute a model's sha256 and report drift."""
        return self.call("POST", f"/api/models/{model_id}/verify")

    # -- collections ------------------------------------------------------------------------------
    def collections(self) -> list[CollectionInfo]:
        """Describe every collection."""
        return [CollectionInfo(**c) for c in self.call("GET", "/api/collections")["collections"]]

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
        self.call("DELETE", f"/api/collections/{name}")

    # -- admin ------------------------------------------------------------------------------------
    def users(self) -> list[dict[str, Any]]:
        """List users."""
        return self.call("GET", "/admin/users")["users"]

    def create_user(self, username: str, role: str = "viewer", password: str | None = None) -> dict[str, Any]:
        """Create a user."""
        return self.call("POST", "/admin/users", json={"username": username, "role": role, "password": password})

    def keys(self) -> list[dict[str, Any]]:
        """List API keys (no secrets)."""
        return self.call("GET", "/admin/keys")["keys"]

    def create_key(self, name: str, **kw: Any) -> dict[str, Any]:
        """Create a key; the returned `key` is the secret, shown once."""
        return self.call("POST", "/admin/keys", json={"name": name, **kw})

    def audit(self, limit: int = 100) -> list[dict[str, Any]]:
        """Recent audit entries."""
        return self.call("GET", "/admin/audit", params={"limit": limit})["entries"]

    # -- background jobs ------------------------------------------------------------------------------
    def jobs(self) -> list[dict[str, Any]]:
        """Background jobs (downloads, training), newest first."""
        return list(self.call("GET", "/api/jobs")["jobs"])

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        """Cancel a running plugin job."""
        return dict(self.call("POST", f"/api/jobs/{job_id}/cancel"))

    def wait_job(self, job_id: str, *, progress: bool = True, timeout: float | None = None) -> dict[str, Any]:
        """Wait for a job with a progress bar; return its result, or raise its error as a BkgError."""
        deadline = None if timeout is None else time.monotonic() + timeout
        bar = tqdm(total=100, desc=job_id, unit="%", disable=not progress, leave=False)
        try:
            while True:
                job = self.call("GET", f"/api/jobs/{job_id}")
                bar.n = round(100 * job["progress"])
                bar.set_postfix_str(job["message"][:60], refresh=True)
                if job["finished"] is not None:
                    break
                if deadline is not None and time.monotonic() > deadline:
                    raise BkgError(f"job {job_id} still {job['state']} after {timeout:g}s", field="job_id")
                time.sleep(0.2)
        finally:
            bar.close()
        if job["state"] != "done":
            exc = BkgError(f"job {job_id} ({job['kind']}) {job['state']}: {job['error']}", field="job_id")
            exc.status, exc.code = 409, f"job_{job['state']}"
            raise exc
        return dict(job["result"] or {})


class PluginTable(list[dict[str, Any]]):
    """Plugins as a notebook table."""

    def _repr_html_(self) -> str:
        rows = [
            (p["id"], p["state"], p["mode"], p["telemetry"]["uptime_s"], p["telemetry"]["rss_bytes"] >> 20,
             p["telemetry"]["requests_per_min"], p["reason"] or "")
            for p in self
        ]  # fmt: skip
        return html_table(["plugin", "state", "mode", "uptime s", "RSS MB", "req/min", "reason"], rows, "bkg plugins")


class RemotePlugin:
    """One plugin on the gateway."""

    def __init__(self, wb: Workbench, plugin_id: str) -> None:
        self.wb, self.id = wb, plugin_id

    def __repr__(self) -> str:
        return f"RemotePlugin({self.id!r})"

    def describe(self) -> dict[str, Any]:
        """Capabilities, settings schema, config and status."""
        return self.wb.call("GET", f"/api/plugins/{self.id}")

    def status(self) -> dict[str, Any]:
        """Lifecycle state."""
        return self.wb.call("GET", f"/api/plugins/{self.id}/status")

    def start(self) -> dict[str, Any]:
        """Start the plugin."""
        return self.wb.call("POST", f"/api/plugins/{self.id}/start")

    def stop(self) -> dict[str, Any]:
        """Stop the plugin."""
        return self.wb.call("POST", f"/api/plugins/{self.id}/stop")

    def restart(self) -> dict[str, Any]:
        """Restart the plugin."""
        return self.wb.call("POST", f"/api/plugins/{self.id}/restart")

    def logs(self, limit: int = 100, level: str | None = None) -> list[dict[str, Any]]:
        """Newest log lines."""
        params: dict[str, Any] = {"limit": limit} | ({"level": level} if level else {})
        return self.wb.call("GET", f"/api/plugins/{self.id}/logs", params=params)["lines"]

    def telemetry(self) -> dict[str, Any]:
        """cpu, memory, requests, errors, latency."""
        return self.wb.call("GET", f"/api/plugins/{self.id}/telemetry")

    def configure(self, **config: Any) -> dict[str, Any]:
        """Validate and save settings (the plugin restarts if running)."""
        return self.wb.call("PUT", f"/api/plugins/{self.id}/config", json={"config": config})

    def invoke(self, capability: str, **data: Any) -> Any:
        """Run one capability."""
        return self.wb.call("POST", f"/api/plugins/{self.id}/invoke/{capability}", json=data)


class RemoteCollection:
    """One collection on the gateway; the same calls as a local `Collection`."""

    def __init__(self, wb: Workbench, name: str) -> None:
        self.wb, self.name = wb, name
        self.base = f"/api/collections/{name}"

    def __repr__(self) -> str:
        return f"RemoteCollection({self.name!r})"

    def _repr_html_(self) -> str:
        return self.describe()._repr_html_()

    def describe(self) -> CollectionInfo:
        """Count, dim, metric, index, bytes, last snapshot."""
        return CollectionInfo(**self.wb.call("GET", self.base))

    def upsert(
        self,
        points: list[dict[str, Any]] | None = None,
        *,
        ids: list[Any] | None = None,
        vectors: Any = None,
        payloads: list[Any] | None = None,
        texts: list[Any] | None = None,
        batch_size: int = 1000,
        progress: bool | None = None,
    ) -> int:
        """Insert or replace points in batches (with a progress bar for big uploads); return how many."""
        if points is None:
            if ids is None or (vectors is None and texts is None):
                raise BkgError("upsert needs points, or ids with vectors (or texts to embed)", field="points")
            ids = ids.tolist() if hasattr(ids, "tolist") else ids
            if vectors is None:  # the gateway embeds the texts with the collection's embed_model
                points = [{"id": i} for i in ids]
            else:
                vecs = vectors.tolist() if hasattr(vectors, "tolist") else vectors
                points = [{"id": i, "vector": v} for i, v in zip(ids, vecs, strict=True)]
            for col, key in ((payloads, "payload"), (texts, "text")):
                if col is not None:
                    for p, value in zip(points, col, strict=True):
                        p[key] = value
        show = len(points) >= 10 * batch_size if progress is None else progress
        done = 0
        with tqdm(total=len(points), desc=f"upsert {self.name}", unit="pt", disable=not show) as bar:
            for a in range(0, len(points), batch_size):
                part = points[a : a + batch_size]
                done += self.wb.call("PUT", f"{self.base}/points", json={"points": part})["upserted"]
                bar.update(len(part))
        return done

    def query(self, vector: Any = None, text: str | None = None, *, k: int = 10, **kw: Any) -> QueryResult:
        """Vector, text or hybrid search (same arguments as `Collection.query`)."""
        body = {"vector": vector.tolist() if hasattr(vector, "tolist") else vector, "text": text, "k": k, **kw}
        r = self.wb.call("POST", f"{self.base}/query", json=body)
        hits = [Hit(h["id"], h["score"], h.get("payload"), h.get("text"), h.get("vector")) for h in r["results"]]
        return QueryResult(hits, r["took_ms"], r["mode"])

    def get(self, ids: list[Any], with_vectors: bool = True) -> list[dict[str, Any]]:
        """Points by id."""
        body = {"ids": ids, "with_vectors": with_vectors}
        return self.wb.call("POST", f"{self.base}/points/get", json=body)["points"]

    def delete(self, ids: list[Any] | None = None, *, filter: dict[str, Any] | None = None) -> int:
        """Delete by ids or filter; return how many."""
        body = {"ids": ids, "filter": filter}
        return int(self.wb.call("POST", f"{self.base}/points/delete", json=body)["deleted"])

    def count(self, filter: dict[str, Any] | None = None) -> int:
        """Count points (optionally matching a filter)."""
        return int(self.wb.call("POST", f"{self.base}/points/count", json={"filter": filter})["count"])

    def snapshot(self) -> dict[str, Any]:
        """Write a snapshot."""
        return self.wb.call("POST", f"{self.base}/snapshots")

    def snapshots(self) -> list[dict[str, Any]]:
        """List snapshots."""
        return self.wb.call("GET", f"{self.base}/snapshots")["snapshots"]

    def restore(self, snapshot_id: str, into: str | None = None) -> CollectionInfo:
        """Restore a snapshot into this collection or a new one."""
        r = self.wb.call("POST", f"{self.base}/snapshots/{snapshot_id}/restore", json={"into": into})
        return CollectionInfo(**r)


def _api_key(settings: Settings, data_dir: Path) -> str | None:
    env = os.environ.get("BKG_API_KEY")
    if env:
        return env
    path = data_dir / "admin.key"
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def _alive(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def connect(
    url: str | None = None,
    *,
    api_key: str | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    start: bool = True,
    timeout: float = 60.0,
) -> Workbench:
    """Connect to the gateway of this data dir, starting one in the background when none runs."""
    settings = Settings() if data_dir is None else Settings(data_dir=Path(data_dir))
    ddir = settings.data_dir.resolve()
    url = url or gateway_url(settings)
    if not _alive(url):
        if not start:
            raise Unavailable(f"no bkg gateway answers at {url} (start one with `bkg serve`)")
        _spawn(settings, ddir, url, timeout)
    return Workbench(url, api_key or _api_key(settings, ddir))


def gateway_url(settings: Settings | None = None) -> str:
    """The URL of the data dir's gateway (its gateway.json), else the configured host and port."""
    settings = settings or Settings()
    state = settings.data_dir.resolve() / "gateway.json"
    if state.exists():
        try:
            return str(json.loads(state.read_text())["url"])
        except (ValueError, KeyError, OSError):
            pass
    return f"http://{settings.host}:{settings.port}"


def _spawn(settings: Settings, ddir: Path, url: str, timeout: float) -> None:
    ddir.mkdir(parents=True, exist_ok=True)
    log = open(ddir / "gateway.log", "ab")  # noqa: SIM115 - handed to the child
    port = url.rsplit(":", 1)[-1].split("/")[0]
    host = url.split("//", 1)[-1].rsplit(":", 1)[0]
    proc = subprocess.Popen(
        [sys.executable, "-m", "bkg_kernel.cli", "serve", "--data-dir", str(ddir), "--host", host, "--port", port],
        stdout=log,
        stderr=log,
        stdin=subprocess.DEVNULL,
        start_new_session=True,  # outlives the notebook kernel, like `ollama serve`
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _alive(url):
            return
        if proc.poll() is not None:
            tail = (ddir / "gateway.log").read_text(errors="replace")[-800:]
            raise Unavailable(f"the bkg gateway exited (code {proc.returncode}) while starting:\n{tail}")
        time.sleep(0.1)
    raise Unavailable(f"the bkg gateway did not answer at {url} within {timeout:.0f}s (see {ddir / 'gateway.log'})")
