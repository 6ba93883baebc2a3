"""repoagent's settings and the input of each capability (their JSON Schema is the API's and the panel's)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from bkg_kernel.errors import InvalidInput
from bkg_kernel.models.defaults import DEFAULT_EMBEDDER
from bkg_kernel.plugins.repoagent.sandbox import CommandSpec, Limits, default_commands
from bkg_kernel.runtime.contract import MASK, PluginSettings

WORKSPACE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,58}$"  # it names a folder and the collection repo-<name>
DEFAULT_IGNORE = [
    ".git/", "node_modules/", "__pycache__/", "*.pyc", ".venv/", "venv/", ".tox/", ".mypy_cache/",
    ".pytest_cache/", ".ruff_cache/", "dist/", "build/", "*.egg-info/", "*.min.js", "*.lock",
]  # fmt: skip


class RepoSettings(PluginSettings):
    """repoagent settings."""

    request_timeout: float = Field(600.0, gt=0, le=3600, description="Seconds before a request gets a 504.")
    repo_roots: list[str] = Field(
        default_factory=list, description="Folders workspaces may live under (default: <data_dir>/repos)."
    )
    ignore: list[str] = Field(
        default_factory=lambda: list(DEFAULT_IGNORE), description="Paths left out everywhere (gitignore syntax)."
    )
    max_files: int = Field(50_000, ge=1, le=2_000_000, description="Files a workspace may hold (after ignores).")
    max_file_bytes: int = Field(1_000_000, ge=1_000, le=100_000_000, description="Larger files are not read.")
    read_window: int = Field(200, ge=10, le=5_000, description="Most lines one repo.file.read returns.")
    commands: dict[str, CommandSpec] = Field(
        default_factory=default_commands, description="The allow-list of repo.command (argv templates, no shell)."
    )
    limits: Limits = Field(default_factory=Limits, description="CPU, memory, file size and output limits.")
    embed_model: str = Field(
        f"candle:{DEFAULT_EMBEDDER}", description="Embeds code chunks: candle:<id> or llmserver:<id>."
    )
    llm_model: str | None = Field(None, description="llmserver model for repo.ask and repo.document.")
    ask_max_tokens: int = Field(320, ge=16, le=4096)
    ask_map_tokens: int = Field(256, ge=0, le=8192, description="Repo map tokens given to repo.ask (0: none).")
    ask_context_tokens: int = Field(
        1200, ge=200, le=1_000_000, description="Prompt budget of repo.ask: the model's context less its answer."
    )
    doc_max_tokens: int = Field(200, ge=16, le=4096)

    def public(self) -> dict[str, Any]:
        """Return the settings with secrets masked: a command's `env` values too (a token a test runner needs), by
        name only, as `secret_fields` are; every plugins:read caller and the audit log read this."""
        data = super().public()
        for spec in data.get("commands", {}).values():
            spec["env"] = {k: MASK if v else v for k, v in spec.get("env", {}).items()}
        return data

    def keep_secrets(self, new: dict[str, Any]) -> dict[str, Any]:
        """Return `new` with masked values replaced by the current ones, a command's `env` values included (a form
        sends back what `public` showed); 422 for a mask this command has no value behind (a new or renamed one)."""
        new = super().keep_secrets(new)
        commands = new.get("commands")
        if not isinstance(commands, dict):
            return new
        kept: dict[str, Any] = {}
        for name, spec in commands.items():
            env = spec.get("env") if isinstance(spec, dict) else None
            if isinstance(env, dict) and MASK in env.values():
                now = self.commands.get(name)
                real = now.env if now is not None else {}
                for key, value in env.items():
                    if value == MASK and key not in real:
                        field = f"config.commands.{name}.env.{key}"
                        msg = f"{MASK!r} stands for a value the gateway hides, and command {name!r} has none"
                        raise InvalidInput(f"{field}: {msg} for {key!r} to keep: give the value itself", field=field)
                spec = {**spec, "env": {k: real[k] if v == MASK else v for k, v in env.items()}}
            kept[name] = spec
        return {**new, "commands": kept}


Name = Field(..., pattern=WORKSPACE_PATTERN, description="A registered workspace.")
RelPath = Field(..., min_length=1, max_length=4096, description="A path relative to the workspace.")


class WorkspaceRequest(BaseModel):
    """Add, list, describe or remove a workspace."""

    # the validator's rules, stated in the JSON Schema too (generated clients and fuzzers see them)
    model_config = ConfigDict(
        json_schema_extra={
            "allOf": [
                {"if": {"properties": {"action": {"const": "list"}}},
                 "else": {"required": ["name"], "properties": {"name": {"type": "string"}}}},
                {"if": {"properties": {"action": {"const": "add"}}},
                 "then": {"required": ["path"], "properties": {"path": {"type": "string"}}}},
            ]
        }
    )  # fmt: skip

    action: Literal["add", "list", "describe", "remove"]
    name: str | None = Field(None, pattern=WORKSPACE_PATTERN)
    path: str | None = Field(
        None, min_length=1, max_length=4096, description="add: a folder under a repo root (absolute, or relative "
        "to the first root).",
    )  # fmt: skip

    @model_validator(mode="after")
    def _needs(self) -> WorkspaceRequest:
        if self.action != "list" and not self.name:
            raise ValueError(f"{self.action} needs a name")
        if self.action == "add" and not self.path:
            raise ValueError("add needs a path")
        return self


class TreeRequest(BaseModel):
    """List a folder's files and subfolders."""

    workspace: str = Name
    path: str = Field(".", min_length=1, max_length=4096)
    depth: int = Field(3, ge=1, le=32)
    limit: int = Field(500, ge=1, le=20_000)


class ReadRequest(BaseModel):
    """Read lines of a text file, numbered."""

    workspace: str = Name
    path: str = RelPath
    start_line: int = Field(1, ge=1)
    end_line: int | None = Field(None, ge=1, description="Last line (default: start + read_window - 1).")


class WriteRequest(BaseModel):
    """Write a text file."""

    workspace: str = Name
    path: str = RelPath
    content: str = Field(..., max_length=20_000_000)
    mode: Literal["overwrite", "append", "create"] = "overwrite"
    force: bool = Field(False, description="Write a Python file even when it does not parse.")


class SearchRequest(BaseModel):
    """Find lines: a literal or a regular expression, in files matching a glob."""

    workspace: str = Name
    query: str = Field(..., min_length=1, max_length=1000)
    regex: bool = False
    case_sensitive: bool = False
    glob: str | None = Field(
        None, max_length=1000, description="Files to search, a pattern as .gitignore reads one: '*.py' (a name, at "
        "any depth), 'src/*.ts' (in src only), 'src/**/*.ts' (in src and its folders). A leading '!' excludes, as "
        "ripgrep's -g does: '!*.md' searches every file but Markdown ('\\!x' for a name that begins with '!').",
    )  # fmt: skip
    limit: int = Field(100, ge=1, le=5_000)


class DiffRequest(BaseModel):
    """Show uncommitted changes."""

    workspace: str = Name
    paths: list[str] = Field(default_factory=list, max_length=1000)


class CommitRequest(BaseModel):
    """Commit changes with git, as the caller."""

    workspace: str = Name
    message: str = Field(..., min_length=1, max_length=20_000)
    paths: list[str] = Field(default_factory=list, max_length=1000, description="Default: every change.")
    signoff: bool = False


class CommandRequest(BaseModel):
    """Run an allow-listed command in the workspace."""

    workspace: str = Name
    name: str = Field(..., min_length=1, max_length=128, description="A key of the `commands` setting.")
    args: list[str] = Field(default_factory=list, max_length=256)


class IndexRequest(BaseModel):
    """Index (or update the index of) a workspace."""

    workspace: str = Name
    full: bool = Field(False, description="Re-parse and re-embed every file, not only changed ones.")


class SymbolsRequest(BaseModel):
    """Find symbols by name, or list those of a path."""

    workspace: str = Name
    query: str | None = Field(None, min_length=1, max_length=500)
    path: str | None = Field(None, min_length=1, max_length=4096)
    kind: str | None = Field(None, max_length=32, description="function, method, class, ...")
    limit: int = Field(50, ge=1, le=5_000)


class RefsRequest(BaseModel):
    """Who defines a symbol and who uses it."""

    workspace: str = Name
    symbol: str = Field(..., min_length=1, max_length=500, description="A name or a qualified name (Class.method).")
    limit: int = Field(200, ge=1, le=10_000)


class MapRequest(BaseModel):
    """A ranked outline of the workspace that fits a token budget."""

    workspace: str = Name
    budget_tokens: int = Field(1024, ge=32, le=65_536)
    focus: list[str] = Field(default_factory=list, max_length=100, description="Files or symbols to rank up.")


class AskRequest(BaseModel):
    """Ask a question about the code."""

    workspace: str = Name
    question: str = Field(..., min_length=1, max_length=4000)
    top_k: int = Field(4, ge=1, le=20, description="How many code chunks the model sees.")


class DocumentRequest(BaseModel):
    """Write Markdown documentation for a symbol or a file."""

    model_config = ConfigDict(
        json_schema_extra={
            "oneOf": [
                {"required": ["symbol"], "properties": {"symbol": {"type": "string"}}},
                {"required": ["path"], "properties": {"path": {"type": "string"}}},
            ]
        }
    )

    workspace: str = Name
    symbol: str | None = Field(None, min_length=1, max_length=500)
    path: str | None = Field(None, min_length=1, max_length=4096)
    force: bool = Field(False, description="Regenerate even the symbols whose code did not change.")

    @model_validator(mode="after")
    def _one(self) -> DocumentRequest:
        if (self.symbol is None) == (self.path is None):
            raise ValueError("give a symbol or a path")
        return self


class Result(BaseModel):
    """A JSON result."""

    model_config = {"extra": "allow"}
