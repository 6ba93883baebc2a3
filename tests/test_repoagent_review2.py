"""repoagent through a real gateway, real git repositories and real tree-sitter grammars: references are placed in
their innermost definition in one sweep (a large generated file indexes), a `glob` that begins with `!` excludes as
ripgrep's `-g '!*.md'` does, and a command's `env` values are masked to every reader of the settings and kept when
the mask comes back. Each test is a defect a review reproduced."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from gateway_harness import Gateway, start_gateway, user_key
from gateway_harness import repo_invoke as invoke
from gateway_harness import repo_job as job
from helpers import git_repo

from bkg_kernel.plugins.repoagent import codeindex
from bkg_kernel.runtime.contract import MASK

SECRET = "s3cret-token-4711"
NESTED = """\
function outer(a) {
  setup(a);
  function inner(b) {
    return helper(b);
  }
  const arrow = (c) => {
    return twice(c);
  };
  return inner(a) + arrow(a);
}
class Box {
  open() { return outer(1); }
  close() {
    function local() { return drop(); }
    return local();
  }
}
class Empty {}
top();
"""
FUNCTIONS = 8000  # in the generated file (~470 KB); one in ten a class with a method


def generated_js(n: int) -> str:
    """A JavaScript file of `n` definitions of four lines each, each calling the one before on its second line,
    every tenth a class with a method."""
    out = []
    for i in range(n):
        prev = f"f{i - 1}" if i else "start"
        if i % 10 == 0:
            out.append(f"class C{i} {{\n  m{i}(a) {{ return {prev}(a) + helper(a); }}\n  // {i}\n}}\n")
        else:
            out.append(f"function f{i}(x) {{\n  const y = {prev}(x);\n  return y + {i};\n}}\n")
    return "".join(out)


SEARCH = {
    "src/a.ts": "const hit = 1;\n",
    "src/sub/b.ts": "const hit = 2;\n",
    "docs/guide.md": "hit the docs\n",
    "README.md": "hit me\n",
    "!bang.txt": "hit a bang\n",
}
COMMANDS = {
    "show-token": {
        "argv": ["python", "-c", "import os; print(os.environ['API_TOKEN'], repr(os.environ['EMPTY']))"],
        "env": {"API_TOKEN": SECRET, "EMPTY": ""},
    },
}


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    base = tmp_path_factory.mktemp("review2")
    roots = base / "repos"
    git_repo(roots / "nest", {"web/nest.js": NESTED})
    git_repo(roots / "search", SEARCH)
    g = start_gateway(base / "data")
    try:
        c = g.client()
        cfg = c.get("/api/plugins/repoagent/config").json()["config"]
        cfg.update(repo_roots=[str(roots)], commands={**cfg["commands"], **COMMANDS})
        c.put("/api/plugins/repoagent/config", json={"config": cfg}).raise_for_status()
        for name in ("nest", "search"):
            r = invoke(g, "repo.workspace", {"action": "add", "name": name, "path": name})
            assert r.status_code == 200, r.text
        yield g
    finally:
        g.stop()


def placed(g: Gateway, ws: str, name: str) -> set[tuple[int, str]]:
    refs = invoke(g, "repo.refs", {"workspace": ws, "symbol": name, "limit": 10_000}).json()["references"]
    return {(r["line"], r["in"]) for r in refs if r["kind"] == "call"}


def test_references_sit_in_their_innermost_definition(gw: Gateway) -> None:
    """Found by a review: each reference was placed by a scan of every definition of its file (8,000 functions:
    5.2 s); now one sweep over sorted spans. The places are the ones the scan found, nested functions included, and
    a class's chunk still ends where its first member begins."""
    done = job(gw, "repo.index", {"workspace": "nest"})
    assert done["state"] == "done", done["error"]
    expect = {
        "setup": {(2, "outer")}, "helper": {(4, "inner")}, "twice": {(7, "arrow")}, "inner": {(9, "outer")},
        "arrow": {(9, "outer")}, "outer": {(12, "Box.open")}, "drop": {(14, "Box.local")},
        "local": {(15, "Box.close")}, "top": {(19, "web.nest")},
    }  # fmt: skip
    for name, where in expect.items():
        assert placed(gw, "nest", name) == where, name
    points = gw.client().post(
        "/api/collections/repo-nest/points/scroll", json={"filter": {"path": "web/nest.js"}, "limit": 100}
    )
    spans = {p["payload"]["symbol"]: (p["payload"]["start"], p["payload"]["end"]) for p in points.json()["points"]}
    assert spans["Box"] == (11, 11) and spans["Empty"] == (18, 18) and spans["outer"] == (1, 10), spans


def test_a_large_generated_file_indexes(tmp_path: Path) -> None:
    """Found by a review: a file of 8,000 functions (442 KB) took 5.2 s to parse, each reference placed by a scan
    of every definition, and a file of thousands of classes longer to chunk (each class's end found the same way).
    Here the index run's parse stage (`codeindex.update`, as `repo.index` runs it) on such a file in a real git
    repository; embedding its thousands of chunks on CPU would take minutes and is not what changed."""
    repo = git_repo(tmp_path / "big", {"big.js": generated_js(FUNCTIONS)})
    idx = codeindex.CodeIndex()
    changed, _, removed = codeindex.update(repo, ["big.js"], idx, 10_000_000, lambda *_: None)
    classes = FUNCTIONS // 10
    assert removed == [] and idx.files["big.js"]["error"] is None
    assert len(idx.symbols()) == 1 + FUNCTIONS + classes  # the module, functions, classes and their methods
    assert len(changed["big.js"]) == 1 + FUNCTIONS + classes  # a chunk each

    def placed_in(name: str) -> set[tuple[int, str]]:
        return {(r["line"], r["in"]) for r in idx.refs() if r["name"] == name and r["kind"] == "call"}

    assert placed_in("f1500") == {(1501 * 4 + 2, "f1501")}
    assert placed_in("f1509") == {(1510 * 4 + 2, "C1510.m1510")}
    assert len(placed_in("helper")) == classes
    assert {r["in"] for r in idx.refs() if r["name"] == "helper"} == {f"C{i}.m{i}" for i in range(0, FUNCTIONS, 10)}
    head = {c["symbol"]: (c["start"], c["end"]) for c in changed["big.js"] if c["kind"] == "class"}
    assert len(head) == classes and head["C2990"] == (2990 * 4 + 1, 2990 * 4 + 1)  # a class's chunk is its head
    assert {(s["start"], s["end"]) for s in idx.symbols() if s["qualname"] == "C2990"} == {(2990 * 4 + 1, 2990 * 4 + 4)}


def test_a_glob_that_begins_with_a_bang_excludes(gw: Gateway) -> None:
    """Found by a review: `!*.md` matched nothing (to gitignore a lone negation only re-includes); a user means
    ripgrep's `-g '!*.md'`: every file but those."""
    base = {"workspace": "search", "query": "hit"}
    every = set(SEARCH)
    expect = {
        "!*.md": every - {"docs/guide.md", "README.md"},
        "!src/": every - {"src/a.ts", "src/sub/b.ts"},
        "!src/*.ts": every - {"src/a.ts"},
        "!**/sub/*": every - {"src/sub/b.ts"},
        "*.md": {"docs/guide.md", "README.md"},
        "\\!bang.txt": {"!bang.txt"},  # an escaped '!' is the name's own
    }
    for glob, files in expect.items():
        r = invoke(gw, "repo.search", {**base, "glob": glob})
        assert r.status_code == 200 and set(r.json()["files"]) == files, (glob, r.text)
    for bad in ("!", "! ", "!!*.md", "!src/a\\"):
        r = invoke(gw, "repo.search", {**base, "glob": bad})
        assert r.status_code == 422 and r.json()["error"]["field"] == "glob", (bad, r.text)
    described = gw.client().get("/api/plugins/repoagent").json()
    schema = next(c for c in described["capabilities"] if c["id"] == "repo.search")["input_schema"]
    assert "'!*.md'" in schema["properties"]["glob"]["description"]


def test_a_command_s_env_values_are_masked_and_kept(gw: Gateway) -> None:
    """Found by a review: `commands[*].env` (a test runner's token, say) was shown to every plugins:read caller and
    written to the audit log. Its values are masked as `upstream_api_key` is, names kept; a config sent back with
    the mask keeps the real value (an operator with plugins:write only may save it), and a mask with no value
    behind it is a 422 naming the variable."""
    reader = user_key(gw, "env-reader", ["plugins:read"])
    operator = user_key(gw, "env-operator", ["plugins:read", "plugins:write"])
    shown_to = gw.client(reader).get("/api/plugins/repoagent/config")
    assert shown_to.status_code == 200 and SECRET not in shown_to.text
    cfg = shown_to.json()["config"]
    assert cfg["commands"]["show-token"]["env"] == {"API_TOKEN": MASK, "EMPTY": ""}
    assert cfg["commands"]["show-token"]["argv"] == COMMANDS["show-token"]["argv"]
    described = gw.client(reader).get("/api/plugins/repoagent")
    assert described.status_code == 200 and SECRET not in described.text
    # sent back as shown: the commands are unchanged, so one who may only tune the plugin may save it
    saved = gw.client(operator).put("/api/plugins/repoagent/config", json={"config": {**cfg, "max_queue": 63}})
    assert saved.status_code == 200 and SECRET not in saved.text, saved.text
    out = job(gw, "repo.command", {"workspace": "search", "name": "show-token"})
    assert out["state"] == "done" and f"{SECRET} ''" in out["result"]["output"], out
    audit = gw.client().get("/admin/audit", params={"action": "plugin.config"}).json()["entries"]
    assert audit and SECRET not in json.dumps(audit)
    # a mask the command has no value behind: refused, nothing saved
    copied = {**cfg["commands"], "copy": cfg["commands"]["show-token"]}
    r = gw.client().put("/api/plugins/repoagent/config", json={"config": {**cfg, "commands": copied}})
    assert r.status_code == 422 and r.json()["error"]["field"] == "config.commands.copy.env.API_TOKEN", r.text
    assert "copy" not in gw.client().get("/api/plugins/repoagent/config").json()["config"]["commands"]
    # a new value replaces the old one
    fresh = {**cfg["commands"]["show-token"], "env": {"API_TOKEN": "other-value", "EMPTY": ""}}
    r = gw.client().put(
        "/api/plugins/repoagent/config", json={"config": {**cfg, "commands": {**cfg["commands"], "show-token": fresh}}}
    )
    assert r.status_code == 200, r.text
    out = job(gw, "repo.command", {"workspace": "search", "name": "show-token"})
    assert out["state"] == "done" and "other-value ''" in out["result"]["output"], out
