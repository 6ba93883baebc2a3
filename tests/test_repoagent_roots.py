"""repoagent's bounds through a real gateway and real git repositories: no workspace reaches the data dir, one
left outside when `repo_roots` narrows answers only its removal, nested `.gitignore` files decide as git's do,
and the scopes the README names are the ones the calls need. Each test is a defect a review reproduced."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from gateway_harness import Gateway, start_gateway, user_key
from gateway_harness import repo_invoke as invoke
from gateway_harness import repo_job as job
from helpers import git, git_repo

README = Path(__file__).resolve().parent.parent / "README.md"
PLUGIN = Path(__file__).resolve().parent.parent / "bkg_kernel" / "plugins" / "repoagent" / "plugin.py"
FILES = {
    "pkg/__init__.py": '"""A tiny package."""\n',
    "pkg/util.py": 'def slugify(text):\n    """Words joined by dashes."""\n    return "-".join(text.split())\n',
    "pkg/core.py": (
        'from pkg.util import slugify\n\n\ndef parse_config(text):\n    """Parse key=value lines."""\n'
        '    return {slugify(k): v for k, _, v in (line.partition("=") for line in text.splitlines())}\n'
    ),
}


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    base = tmp_path_factory.mktemp("roots")
    git_repo(base / "repos" / "demo", FILES)
    (base / "other").mkdir()
    g = start_gateway(base / "data")
    yield g
    g.stop()


def set_roots(g: Gateway, *roots: Path) -> None:
    """Set `repo_roots` (the plugin restarts with them; its saved workspaces stay)."""
    c = g.client()
    cfg = c.get("/api/plugins/repoagent/config").json()["config"]
    cfg.update(repo_roots=[str(r) for r in roots])
    c.put("/api/plugins/repoagent/config", json={"config": cfg}).raise_for_status()


def remove(g: Gateway, name: str) -> None:
    r = invoke(g, "repo.workspace", {"action": "remove", "name": name})
    assert r.status_code == 200, r.text


def test_no_workspace_reaches_the_data_dir(gw: Gateway) -> None:
    """Found by a review: with a root that holds the data dir, a `repo:use` caller added the data dir, read
    workbench.key (the admin's key) and wrote plugins.json."""
    base, data = gw.data_dir.parent, gw.data_dir
    key = user_key(gw, "dev", ["repo:use", "collections:read"])
    set_roots(gw, base)
    try:
        for path in ("data", str(data), "data/plugins", "data/plugins/repoagent", "."):  # it, in it, holding it
            r = invoke(gw, "repo.workspace", {"action": "add", "name": "state", "path": path}, key)
            assert r.status_code == 403, (path, r.text)
            err = r.json()["error"]
            assert err["field"] == "path" and "data dir" in err["message"], err
        # the data dir's repos folder (the default root) is where workspaces belong
        git_repo(data / "repos" / "own", FILES)
        ok = invoke(gw, "repo.workspace", {"action": "add", "name": "own", "path": "data/repos/own"}, key)
        assert ok.status_code == 200, ok.text
        assert invoke(gw, "repo.file.read", {"workspace": "own", "path": "pkg/util.py"}, key).status_code == 200
        remove(gw, "own")

        # one saved by a bkg that let it be added: refused on every call but its removal
        saved = data / "plugins" / "repoagent" / "workspaces.json"
        entries = json.loads(saved.read_text()) if saved.exists() else []
        saved.write_text(json.dumps([*entries, {"name": "state", "path": str(data.resolve())}]))
        set_roots(gw, base, base / "other")  # a restart: the saved list is read again
        for cap, body in (
            ("repo.file.read", {"path": "workbench.key"}),
            ("repo.file.write", {"path": "plugins.json.probe", "content": "{}\n"}),
            ("repo.search", {"query": "bkg_"}),
            ("repo.tree", {}),
        ):
            r = invoke(gw, cap, {"workspace": "state", **body}, key)
            assert r.status_code == 403 and r.json()["error"]["field"] == "workspace", (cap, r.text)
        assert not (data / "plugins.json.probe").exists()
        listed = invoke(gw, "repo.workspace", {"action": "list"}, key).json()["workspaces"]
        state = next(w for w in listed if w["name"] == "state")
        assert "data dir" in state["off_limits"]
        remove(gw, "state")
    finally:
        set_roots(gw, base / "repos")


def test_a_workspace_outside_narrowed_roots_answers_only_its_removal(gw: Gateway) -> None:
    """Found by a review: after `repo_roots` was narrowed, a workspace added under the old roots was still read
    and written."""
    base = gw.data_dir.parent
    repo = base / "repos" / "demo"
    set_roots(gw, base / "repos")
    assert invoke(gw, "repo.workspace", {"action": "add", "name": "demo", "path": "demo"}).status_code == 200
    try:
        assert invoke(gw, "repo.file.read", {"workspace": "demo", "path": "pkg/util.py"}).status_code == 200
        set_roots(gw, base / "other")
        ws = {"workspace": "demo"}
        calls = {
            "repo.workspace": {"action": "describe", "name": "demo"},
            "repo.tree": ws,
            "repo.file.read": {**ws, "path": "pkg/util.py"},
            "repo.file.write": {**ws, "path": "new.txt", "content": "hi\n"},
            "repo.search": {**ws, "query": "slugify"},
            "repo.diff": ws,
            "repo.commit": {**ws, "message": "m"},
            "repo.symbols": {**ws, "query": "slugify"},
            "repo.refs": {**ws, "symbol": "slugify"},
            "repo.map": ws,
            "repo.ask": {**ws, "question": "what does slugify do?"},
        }
        for cap, body in calls.items():
            r = invoke(gw, cap, body)
            assert r.status_code == 403, (cap, r.text)
            err = r.json()["error"]
            assert err["field"] == "workspace" and "repo roots" in err["message"], (cap, err)
        for cap, body in {
            "repo.index": ws,
            "repo.command": {**ws, "name": "git-status"},
            "repo.document": {**ws, "symbol": "slugify"},
        }.items():  # jobs: refused when they run
            done = job(gw, cap, body)
            assert done["state"] == "failed" and "outside the repo roots" in done["error"], (cap, done)
        streamed = gw.client().post("/api/repo/demo/run/git-status", json={})
        assert streamed.status_code == 403 and streamed.json()["error"]["field"] == "workspace", streamed.text
        assert not (repo / "new.txt").exists() and git(repo, "log", "--format=%s") == "init\n"
        listed = invoke(gw, "repo.workspace", {"action": "list"}).json()["workspaces"]
        demo = next(w for w in listed if w["name"] == "demo")
        assert demo["outside_roots"] is True and "repo roots" in demo["off_limits"]
        remove(gw, "demo")  # still removable, its files kept
        assert (repo / "pkg" / "util.py").exists()
        set_roots(gw, base / "repos")
        assert invoke(gw, "repo.workspace", {"action": "add", "name": "demo", "path": "demo"}).status_code == 200
        listed = invoke(gw, "repo.workspace", {"action": "list"}).json()["workspaces"]
        assert next(w for w in listed if w["name"] == "demo")["outside_roots"] is False
    finally:
        set_roots(gw, base / "repos")
        invoke(gw, "repo.workspace", {"action": "remove", "name": "demo"})


def test_nested_gitignore_negations_decide_as_git_does(gw: Gateway) -> None:
    """Found by a review: outside git, a nested `.gitignore`'s `!keep.log` was ignored (any level that matched
    ignored the file); git lets the deepest level with a matching pattern decide."""
    base = gw.data_dir.parent
    folder = base / "repos" / "nogit"
    files = {
        ".gitignore": "*.log\n*.tmp\n",
        "sub/.gitignore": "!keep.log\n!*.tmp\nlocal.txt\n",
        "sub/deep/.gitignore": "keep.log\n",
        "a.txt": "a\n", "drop.log": "drop\n", "x.tmp": "x\n", "local.txt": "kept at the top\n",
        "sub/keep.log": "keep\n", "sub/drop.log": "drop\n", "sub/y.tmp": "y\n", "sub/local.txt": "drop\n",
        "sub/deep/keep.log": "drop again\n", "sub/deep/z.tmp": "z\n", "sub/deep/other.log": "drop\n",
    }  # fmt: skip
    for rel, text in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(text)
    copy = base / "gitcheck"  # what git itself says of the same files
    shutil.copytree(folder, copy)
    git(copy, "init", "-q")
    want = sorted(git(copy, "ls-files", "--others", "--exclude-standard").split())
    assert "sub/keep.log" in want and "sub/deep/keep.log" not in want and "sub/drop.log" not in want
    assert invoke(gw, "repo.workspace", {"action": "add", "name": "nogit", "path": "nogit"}).status_code == 200
    try:
        tree = invoke(gw, "repo.tree", {"workspace": "nogit", "depth": 5}).json()
        assert sorted(e["path"] for e in tree["entries"] if e["type"] == "file") == want
        found = invoke(gw, "repo.search", {"workspace": "nogit", "query": "^keep$", "regex": True}).json()
        assert set(found["files"]) == {"sub/keep.log"}
    finally:
        remove(gw, "nogit")


# What each repoagent call needs besides `repo:use` (it reaches the store and the LLM as its caller), as the README
# and the plugin's docstring say it
NEEDS = {
    "add": ("`repo.workspace` add `collections:read`", ["collections:read"]),
    "index": ("`repo.index` `collections:read`, `collections:write` and `llm:use`",
              ["collections:read", "collections:write", "llm:use"]),
    "ask": ("`repo.ask` `collections:read` and `llm:use`", ["collections:read", "llm:use"]),
    "document": ("`repo.document` `llm:use`", ["llm:use"]),
    "remove": ("removing an indexed workspace `collections:write`", ["collections:write"]),
}  # fmt: skip


def test_the_scopes_the_readme_names_are_the_ones_the_calls_need(gw: Gateway) -> None:
    """Found by a review: the README said only `repo.index` and `repo.ask` needed more than `repo:use`; adding and
    asking need `collections:read` too, and removing an indexed workspace `collections:write`. Each call is made
    with what it is said to need (it succeeds) and with each of those scopes left out in turn (refused, naming
    it)."""
    set_roots(gw, gw.data_dir.parent / "repos")
    keys: dict[tuple[str, ...], str] = {}

    def key(*scopes: str) -> str:
        if scopes not in keys:
            keys[scopes] = user_key(gw, f"u{len(keys)}", ["repo:use", *scopes])
        return keys[scopes]

    def call(cap: str, body: dict[str, Any], k: str) -> tuple[bool, str]:  # a job's outcome once it ends
        r = invoke(gw, cap, body, k)
        if r.status_code != 202:
            return r.status_code == 200, r.text
        done = gw.wait_job(r.json()["job"]["id"])
        return done["state"] == "done", str(done["error"])

    def needs(what: str, cap: str, body: dict[str, Any]) -> None:
        scopes = NEEDS[what][1]
        for missing in scopes:
            ok, said = call(cap, body, key(*(s for s in scopes if s != missing)))
            assert not ok and f"needs scope '{missing}'" in said, (what, missing, said)
        ok, said = call(cap, body, key(*scopes))
        assert ok, (what, said)

    needs("add", "repo.workspace", {"action": "add", "name": "scoped", "path": "demo"})
    needs("index", "repo.index", {"workspace": "scoped"})
    needs("ask", "repo.ask", {"workspace": "scoped", "question": "What does slugify do?"})
    needs("document", "repo.document", {"workspace": "scoped", "symbol": "slugify"})
    needs("remove", "repo.workspace", {"action": "remove", "name": "scoped"})
    # a workspace never indexed is removed with `repo:use` alone
    assert call("repo.workspace", {"action": "add", "name": "scoped", "path": "demo"}, key("collections:read"))[0]
    assert call("repo.workspace", {"action": "remove", "name": "scoped"}, key())[0]

    readme = README.read_text()
    section = " ".join(readme[readme.index("**repoagent**") :].split("\n\n", 1)[0].split())
    doc = PLUGIN.read_text()
    doc = " ".join(doc[: doc.index('"""', 3)].split())
    for phrase, _ in NEEDS.values():
        assert phrase in section, phrase
        assert phrase in doc, phrase
