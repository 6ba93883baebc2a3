"""One settings object shared by the gateway, notebooks, Voila and papermill (env `BKG_*`, a TOML file, defaults)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import Field, field_validator
from pydantic_core import PydanticCustomError
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from bkg_kernel.errors import InvalidInput, closest, escaped, is_utf8

# Credentials that reach the gateway through its environment: read into Settings, then removed from the process
# environment, so that no plugin worker, job worker or kernel inherits them.
SECRET_ENV = ("BKG_ADMIN_KEY", "BKG_API_KEY", "JUPYTERHUB_API_TOKEN", "JPY_API_TOKEN")


def scrubbed_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """`env` (default: this process's) without the secrets a child must not inherit: the admin key, the API key,
    every Hub token and `JUPYTERHUB_*` (plugin workers, job workers and their kernels, on any executor)."""
    src = os.environ if env is None else env
    return {k: v for k, v in src.items() if k not in SECRET_ENV and not k.startswith("JUPYTERHUB_")}


# An empty path is the working directory to pathlib: a data dir set to "" would put the catalog, the keys and the
# indexes wherever the process happens to run (a model dir: the model files).
EMPTY_PATH = "must not be empty: name a folder ('.' for the working directory)"


def folder_named(value: Any, field: str, where: str = "") -> None:
    """Refuse an empty folder name ("" from an argument or an option) for `field` (`where` it came from)."""
    if isinstance(value, str | bytes) and not value:
        raise InvalidInput(f"{field}{f' ({where})' if where else ''}: {EMPTY_PATH}", field=field)


def folder_problem(value: Any) -> str | None:
    """What makes a folder's path unusable, or None: text that is not UTF-8 (the store's database, DuckDB, takes
    UTF-8 paths only), a name over 255 bytes or a path over 4096 (what the OS refuses, ENAMETOOLONG)."""
    if not isinstance(value, str | os.PathLike):
        return None
    text = os.fspath(value)
    if not isinstance(text, str):
        return None
    if "\x00" in text:
        return "a path cannot contain NUL"
    if not is_utf8(text):
        return f"'{escaped(text)}' is not valid UTF-8 text: name a folder whose name is (or rename it)"
    raw = os.fsencode(text)
    if len(raw) > 4096 or any(len(part) > 255 for part in raw.split(b"/")):
        return f"path too long: {text[:60]!r}... (a name is at most 255 bytes, a path 4096)"
    return None


def folder_option(field: str, option: str) -> Callable[[str], Path]:
    """The CLI's parser for a folder option (`--data-dir`): typer reads "" as Path("."), the working directory; a
    path no folder can have (not UTF-8, too long) is refused naming the option, before anything looks at it."""

    def parse(text: str) -> Path:
        folder_named(text, field, option)
        problem = folder_problem(text)
        if problem:
            raise InvalidInput(f"{field} ({option}): {problem}", field=field)
        return Path(text)

    return parse


def _config_file() -> Path:
    """The TOML file to read: BKG_CONFIG's, else ./bkg.toml (which need not exist); a BKG_CONFIG that names no file
    is refused, naming it (it was ignored without a word, and every setting of the file silently left at its
    default)."""
    named = os.environ.get("BKG_CONFIG")
    if named is None:
        here = Path("bkg.toml")
        if (here.exists() or here.is_symlink()) and not here.is_file():  # passed over without a word, before
            what = "a folder" if here.is_dir() else "a link to nothing" if not here.exists() else "not a regular file"
            raise InvalidInput(f"{here.absolute()} is {what}, not a TOML file: rename it, or name the file to read "
                               "with BKG_CONFIG", field="bkg.toml")  # fmt: skip
        return here
    if not named:
        raise InvalidInput(
            "BKG_CONFIG is set but empty: name a TOML file, or unset it for ./bkg.toml", field="BKG_CONFIG"
        )
    path = Path(named)
    if not path.is_file():
        what = "a folder" if path.is_dir() else "not a regular file" if path.exists() else "not there"
        raise InvalidInput(f"BKG_CONFIG names {path.absolute()}, which is {what}", field="BKG_CONFIG")
    return path


class Settings(BaseSettings):
    """bkg settings: explicit arguments beat `BKG_*` environment variables, which beat `bkg.toml`, then defaults."""

    model_config = SettingsConfigDict(env_prefix="BKG_", extra="ignore")

    data_dir: Path = Field(Path("./data"), description="Where the DuckDB catalog, FAISS indexes and snapshots live.")
    host: str = Field("127.0.0.1", description="Address the gateway binds to.")
    port: int = Field(
        43119,
        ge=0,
        le=65535,
        description="Port the gateway listens on; 0 takes any free one (the URL printed and gateway.json name it).",
    )
    call_port: int = Field(
        0,
        ge=-1,
        le=65535,
        description="Port of the call port, plugin calls over a plain TCP socket beside HTTP on the same host "
        "(0: a free port, named in /health, or none when the gateway runs as a JupyterHub service; -1: none, every "
        "call over HTTP).",
    )
    model_dir: Path = Field(Path("./models"), description="Where model files and the model manifest live.")
    body_idle_s: float = Field(
        30.0, gt=0, le=3600, description="A request body that stops coming this long is answered 408 and closed."
    )
    shutdown_grace_s: int = Field(
        15, ge=0, le=3600, description="On SIGTERM, how long requests in flight may run before they are cut off."
    )
    min_free_mb: int = Field(
        512,
        ge=0,
        le=10**7,
        description="Writes to the store (upserts, snapshots, restores) are a 507 while the data "
        "dir's disk has less free than this (a full disk leaves DuckDB unusable until a restart); 0: no check.",
    )
    io_threads: int = Field(
        32,
        ge=4,
        le=512,
        description="Threads for the routes' blocking work (store, files, worker answers): waits "
        "on a lock or a disk cost no CPU, so more than the cores.",
    )
    max_body_mb: float = Field(
        32.0, gt=0, le=4096, description="Largest request body the gateway accepts (413 above it), in MB."
    )
    download_allow: list[str] = Field(
        default_factory=list,
        description="Hosts (glob patterns) model downloads may come from; empty: any public host. A host on a "
        "loopback, link-local or private address is refused unless listed here.",
    )
    max_download_mb: float = Field(65_536, gt=0, description="Largest model download, in MB (declared or streamed).")
    index_save_interval: float = Field(
        30.0,
        ge=0,
        description="Seconds between FAISS index saves during ingest; indexes are always saved on close.",
    )
    # -- what is kept of what is over (0: kept for good) ------------------------------------------------------
    key_keep_days: float = Field(
        90.0,
        ge=0,
        le=36_500,
        description="Keys revoked or expired more than this many days ago are deleted (a notebook run's "
        "key is revoked as the run ends).",
    )
    audit_keep_days: float = Field(
        365.0, ge=0, le=36_500, description="Audit log entries older than this many days are deleted."
    )
    usage_keep_days: float = Field(
        365.0, ge=0, le=36_500, description="Token usage rows older than this many days are deleted."
    )
    # -- notebook jobs (papermill) ---------------------------------------------------------------------------
    job_roots: Annotated[list[Path] | None, NoDecode] = Field(
        None,
        description="Folders whose notebooks may run as jobs (env BKG_JOB_ROOTS, ':'-separated); unset: ./notebooks "
        "and <data_dir>/notebooks. Whoever can write a notebook here runs code as the gateway's OS user.",
    )
    job_file_roots: Annotated[list[Path] | None, NoDecode] = Field(
        None,
        description="Folders the shipped job notebooks may read files from when a parameter names one (env "
        "BKG_JOB_FILE_ROOTS, ':'-separated); unset: <data_dir>/files. A job's kernel runs as the gateway's OS user: "
        "never the data dir's own files (keys, the database), whatever is set.",
    )
    job_workers: int = Field(2, ge=1, le=64, description="Job workers (each keeps one warm kernel): runs at once.")
    job_executor: str = Field(
        "local", pattern=r"^(local|dask://[A-Za-z0-9_.\-]+:\d{1,5})$", description="'local' or dask://host:port."
    )
    job_keep_runs: int = Field(
        500, ge=1, description="Finished runs kept per owner (newest first); older ones are deleted."
    )
    job_keep_days: float = Field(30.0, gt=0, description="Finished runs older than this many days are deleted.")
    job_max_output_bytes: int = Field(
        10 * 1024 * 1024,
        ge=1024,
        description="Bytes of output a run keeps (printed text, images, tables, results, by their size in the "
        "output notebook); printing past it is cut, a display dropped, each with a marker; an error is always kept.",
    )
    job_webhook_url: str | None = Field(None, description="Called with a run's summary when any run fails.")
    job_webhook_success: bool = Field(False, description="Call job_webhook_url for succeeded runs too.")
    webhook_allow: list[str] = Field(
        default_factory=list,
        description="Hosts (glob patterns) a job webhook may reach on a loopback or private address.",
    )
    heartbeat_timeout_s: float = Field(
        5.0, gt=0, le=600, description="A plugin worker silent this long (heartbeats every second) is degraded."
    )
    hung_restart_s: float = Field(
        15.0, gt=0, le=3600, description="A plugin worker silent this long is hung: killed and started again."
    )
    job_catch_up: bool = Field(True, description="A schedule that missed runs while the gateway was down runs once.")
    job_overlap: str = Field(
        "skip", pattern=r"^(skip|queue)$", description="A schedule due while its last run is still going: skip|queue."
    )
    job_tick_s: float = Field(5.0, gt=0, le=60, description="How often schedules are checked, in seconds.")
    job_max_waiting: int = Field(
        100, ge=1, le=100_000, description="Runs one user may have queued or running at once (429 past it)."
    )
    job_max_schedules: int = Field(100, ge=1, le=100_000, description="Schedules one user may own (429 past it).")
    # -- JupyterHub (set by the Hub in a service's or a user server's environment) ----------------------------
    hub_api_token: str | None = Field(
        None, validation_alias="JUPYTERHUB_API_TOKEN", description="The Hub token of this service or user server."
    )
    hub_api_url: str | None = Field(None, validation_alias="JUPYTERHUB_API_URL", description="The Hub's API URL.")
    hub_service_name: str | None = Field(
        None, validation_alias="JUPYTERHUB_SERVICE_NAME", description="Set when the gateway runs as a Hub service."
    )
    hub_service_prefix: str | None = Field(
        None, validation_alias="JUPYTERHUB_SERVICE_PREFIX", description="The path the Hub's proxy routes here."
    )
    hub_user: str | None = Field(
        None, validation_alias="JUPYTERHUB_USER", description="Set in a Hub user's server (and its kernels)."
    )
    # -- clients (notebooks, Voila, the lab server extension) -------------------------------------------------
    gateway_url: str | None = Field(
        None, description="The gateway clients use; unset: the gateway of data_dir (started when none runs)."
    )
    api_key: str | None = Field(
        None,
        description="The API key clients send; unset: data_dir/workbench.key (developer scopes; admin.key only for "
        "the CLI's admin commands and `bkg run --admin`).",
    )
    admin_key: str | None = Field(
        None, description="The gateway's first admin key, on first start only (unset: a new key in admin.key)."
    )
    dashboards_url: str | None = Field(None, description="Where Voila serves the dashboards (set by `bkg run`).")
    dashboards_dir: Path = Field(Path("dashboards"), description="The folder of dashboard notebooks.")
    lab_start_gateway: bool = Field(
        True, description="The lab server extension starts a gateway when none runs on data_dir."
    )

    @field_validator("data_dir", "model_dir", mode="before")
    @classmethod
    def _folder_named(cls, value: Any) -> Any:
        """Refuse an empty folder (BKG_DATA_DIR="", `model_dir = ""`), which pathlib reads as the working one."""
        if isinstance(value, str | bytes) and not value:
            raise PydanticCustomError("empty_path", EMPTY_PATH)
        problem = folder_problem(value)
        if problem:
            raise PydanticCustomError("bad_path", problem)
        return value

    @field_validator("job_roots", "job_file_roots", mode="before")
    @classmethod
    def _split_roots(cls, value: Any) -> Any:
        """Read BKG_JOB_ROOTS and BKG_JOB_FILE_ROOTS like PATH: folders separated by ':'."""
        if isinstance(value, str):
            return [p for p in value.split(os.pathsep) if p]
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        path = _config_file()
        try:
            toml = TomlConfigSettingsSource(settings_cls, toml_file=path)
        except OSError as exc:  # there but unreadable (its mode): one line, not a traceback
            field = "BKG_CONFIG" if "BKG_CONFIG" in os.environ else None
            raise InvalidInput(f"{path.absolute()} cannot be read: {exc.strerror or exc}", field=field) from None
        except UnicodeDecodeError as exc:  # TOML is UTF-8 text (a file saved in Latin-1, or not text at all)
            field = "BKG_CONFIG" if "BKG_CONFIG" in os.environ else None
            raise InvalidInput(
                f"{path.absolute()} is not UTF-8 text (byte {exc.start}), which a TOML file must be: save it as UTF-8",
                field=field,
            ) from None
        _known_keys(settings_cls, path, toml())
        return (init_settings, env_settings, toml)


def _known_keys(settings_cls: type[BaseSettings], path: Path, read: Mapping[str, Any]) -> None:
    """Refuse a key of the TOML file that is no setting, naming it and the file (a typo such as `prot = 5` left every
    setting at its default without a word). `read` is what the TOML source kept: a key it matched to a setting
    (in any case) under that setting's name, any other key as written. Unknown `BKG_*` environment variables stay
    ignored: the environment is shared with other tools, and one of a newer or older bkg is no mistake here."""
    names: dict[str, str] = {}  # every spelling a misspelt key is likely to be, lower case -> the key to write
    for name, field in settings_cls.model_fields.items():
        key = field.validation_alias if isinstance(field.validation_alias, str) else name
        names.update({name: key, key.lower(): key, f"bkg_{name}": key})
    unknown = [k for k in read if k not in names.values()]
    if not unknown:
        return
    said = []
    for i, key in enumerate(unknown):
        near = names.get(key.lower())
        if near is None:
            spelt = closest(key.lower(), names)
            near = names[spelt] if spelt else None
        where = f" in {path.absolute()}" if i == 0 else ""  # the message starts with the field it names
        said.append(f"{key}{where}: no such setting ({f'did you mean {near!r}?' if near else 'none is named like it'})")
    raise InvalidInput(f"{'; '.join(said)}; `bkg settings` lists the settings", field=unknown[0])


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Return the process-wide settings (read once)."""
    return Settings()


def from_cwd_config(settings: Settings, *names: str) -> Path | None:
    """The working directory's config file when `settings` took one of `names` from it, else None.

    `bkg.toml` (or a relative BKG_CONFIG) is read from wherever the process runs, so a cloned repository's file is
    read like one's own: what it alone chose must not decide where a credential goes (`client.workbench.vet_gateway`).
    A file that an absolute BKG_CONFIG names is the user's choice, and BKG_* variables beat the file. Arguments to
    Settings() beat it too but are not seen here: for settings made without arguments for `names`."""
    path = _config_file()
    if path.is_absolute() or not path.is_file():
        return None
    in_file = TomlConfigSettingsSource(type(settings), toml_file=path)()
    in_env = EnvSettingsSource(type(settings))()
    return path.resolve() if any(n in in_file and n not in in_env for n in names) else None


def gateway_url(settings: Settings | None = None) -> str:
    """The gateway clients use: `gateway_url` when set, else the data dir's (its gateway.json), else host:port."""
    settings = settings or Settings()
    if settings.gateway_url:
        return settings.gateway_url.rstrip("/")
    state = settings.data_dir.resolve() / "gateway.json"
    try:
        url = json.loads(state.read_text())["url"]
    except (ValueError, KeyError, TypeError, OSError):  # missing, or not a gateway's (`[]`, not JSON, not UTF-8)
        url = None
    if isinstance(url, str) and _http_url(url):  # a URL that is none (`5`, `http://[::1`): as if no file were there
        return url
    return f"http://{settings.host}:{settings.port}"


def _http_url(url: str) -> bool:
    """Whether `url` is an http(s) URL with a host and, if any, a port (`client.transport.is_http_url`)."""
    try:
        parts = urlsplit(url)
        return parts.scheme in ("http", "https") and bool(parts.hostname) and (parts.port or 0) >= 0
    except ValueError:  # `http://[::1`, `http://[zz]:1`, `http://h:abc`
        return False
