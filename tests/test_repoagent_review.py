"""repoagent's search, diff and commit through a real gateway and real git repositories: a regex's repeats in
sequence count towards its compile cap, a tracked file turned FIFO does not hang a search, the paths a caller
names are literal to git, `glob` reads as git's wildmatch, and untracked files are diffed without a git process
each. Each test is a defect a review reproduced."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from gateway_harness import Gateway, start_gateway
from gateway_harness import repo_invoke as invoke
from helpers import git, git_repo

FILES = {
    "pkg/util.py": 'def slugify(text):\n    """Words joined by dashes."""\n    return "-".join(text.split())\n',
    "src/a.ts": "function a(): number { return 1; }\n",
    "src/sub/b.ts": "function b(): number { return 2; }\n",
    "lib/c.ts": "function c(): number { return 3; }\n",
    "README.md": "# demo: slugify things\n",
}


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A gateway whose `git` is a wrapper that notes each run (to count the processes a call starts)."""
    base = tmp_path_factory.mktemp("review")
    roots = base / "repos"
    for name in ("search", "paths", "many"):
        git_repo(roots / name, FILES)
    wrapper = base / "bin" / "git"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\necho "$1" >> {base / "git-runs"}\nexec {shutil.which("git")} "$@"\n')
    wrapper.chmod(0o755)
    g = start_gateway(base / "data", env={"PATH": f"{wrapper.parent}{os.pathsep}{os.environ['PATH']}"})
    try:
        c = g.client()
        cfg = c.get("/api/plugins/repoagent/config").json()["config"]
        cfg.update(repo_roots=[str(roots)])
        c.put("/api/plugins/repoagent/config", json={"config": cfg}).raise_for_status()
        for name in ("search", "paths", "many"):
            r = invoke(g, "repo.workspace", {"action": "add", "name": name, "path": name})
            assert r.status_code == 200, r.text
        yield g
    finally:
        g.stop()


def repo_of(g: Gateway, name: str) -> Path:
    return g.data_dir.parent / "repos" / name


def git_runs(g: Gateway) -> int:
    runs = g.data_dir.parent / "git-runs"
    return len(runs.read_text().splitlines()) if runs.exists() else 0


def test_repeats_in_sequence_add_up_towards_the_compile_cap(gw: Gateway) -> None:
    """Found by a review: the cap took the largest of the repeats in sequence, not their sum: `a{99999}` 125 times
    (1,000 characters) passed it, and compiling it took 3.4 GB in the worker (here two, enough to pass the cap)."""
    base = {"workspace": "search", "regex": True}
    for query in ("a{60000}" * 2, "a{40000}b{40000}c{40000}", "(?:a{1000}){1000}", "(?:x{200}|y{200}){300}"):
        r = invoke(gw, "repo.search", {**base, "query": query})
        assert r.status_code == 422 and r.json()["error"]["field"] == "query", (query, r.text)
        assert "too much memory" in r.json()["error"]["message"], r.text
    ok = invoke(gw, "repo.search", {**base, "query": r"slug\w{2,4}|a{3}\d{0,9}"})
    assert ok.status_code == 200 and set(ok.json()["files"]) == {"pkg/util.py", "README.md"}, ok.text


def test_a_tracked_file_replaced_by_a_fifo_does_not_hang_a_search(gw: Gateway) -> None:
    """Found by a review: `git ls-files` still lists a tracked file replaced by a FIFO, and repo.search read it:
    the read waited for a writer that never came, and the search never answered."""
    repo = repo_of(gw, "search")
    readme, saved = repo / "README.md", repo.parent / "README.md.saved"
    readme.rename(saved)
    os.mkfifo(readme)
    try:
        r = invoke(gw, "repo.search", {"workspace": "search", "query": "slugify"}, timeout=30)
        assert r.status_code == 200 and list(r.json()["files"]) == ["pkg/util.py"], r.text
    finally:
        with contextlib.suppress(OSError):  # a reader blocked in its open (the old search) is let go
            os.close(os.open(readme, os.O_WRONLY | os.O_NONBLOCK))
        readme.unlink()
        saved.rename(readme)


def test_paths_are_literal_to_git_in_diff_and_commit(gw: Gateway) -> None:
    """Found by a review: `paths` went to git as pathspecs: committing `[1].txt` committed `1.txt` (a wildcard
    class) as well, and a diff or commit of `app/[slug]/page.tsx` took a half-done `app/s/page.tsx` along."""
    base, repo = {"workspace": "paths"}, repo_of(gw, "paths")
    for path, text in (("1.txt", "draft, not ready\n"), ("[1].txt", "ready\n"), ("app/s/page.tsx", "one\n")):
        assert invoke(gw, "repo.file.write", {**base, "path": path, "content": text}).status_code == 200
    d = invoke(gw, "repo.diff", {**base, "paths": ["[1].txt"]}).json()
    assert [f["path"] for f in d["files"]] == ["[1].txt"] and "draft" not in d["diff"], d
    c = invoke(gw, "repo.commit", {**base, "message": "the [1] file", "paths": ["[1].txt"]})
    assert c.status_code == 200 and [f["path"] for f in c.json()["files"]] == ["[1].txt"], c.text
    assert git(repo, "show", "--name-only", "--format=", "HEAD").split() == ["[1].txt"]
    assert git(repo, "status", "--porcelain", "--", "1.txt").startswith("??")  # still not committed

    assert invoke(gw, "repo.commit", {**base, "message": "s page", "paths": ["app/s/page.tsx"]}).status_code == 200
    wip = {**base, "path": "app/s/page.tsx", "content": "// WIP: half-done edit, do not commit\n"}
    assert invoke(gw, "repo.file.write", wip).status_code == 200
    page = {**base, "path": "app/[slug]/page.tsx", "content": "export default function Page() { return 1; }\n"}
    assert invoke(gw, "repo.file.write", page).status_code == 200
    d = invoke(gw, "repo.diff", {**base, "paths": ["app/[slug]/page.tsx"]}).json()
    assert [f["path"] for f in d["files"]] == ["app/[slug]/page.tsx"] and "WIP" not in d["diff"], d
    c = invoke(gw, "repo.commit", {**base, "message": "the [slug] page", "paths": ["app/[slug]/page.tsx"]})
    assert c.status_code == 200, c.text
    committed = git(repo, "show", "--name-only", "--format=", "HEAD").split()
    assert committed == ["app/[slug]/page.tsx"] == [f["path"] for f in c.json()["files"]], c.text
    assert git(repo, "status", "--porcelain", "--", "app/s/page.tsx").startswith(" M")  # the WIP edit, unstaged
    # with no paths, every change (the exclude pathspec for repo.write's temp files still works)
    (repo / "app" / ".page.tsx.x1.bkg-tmp").write_text("half a write")
    c = invoke(gw, "repo.commit", {**base, "message": "the rest"})
    assert c.status_code == 200 and {f["path"] for f in c.json()["files"]} == {"1.txt", "app/s/page.tsx"}, c.text
    assert git(repo, "status", "--porcelain") == "?? app/.page.tsx.x1.bkg-tmp\n"
    (repo / "app" / ".page.tsx.x1.bkg-tmp").unlink()


def test_glob_reads_as_git_s_wildmatch(gw: Gateway) -> None:
    """Found by a review: `glob` went to fnmatch, whose `*` crosses `/` and whose `**/` needs a folder: the
    documented `src/**/*.ts` missed `src/a.ts`, and `src/*.ts` matched `src/sub/b.ts`."""
    base = {"workspace": "search", "query": "function"}
    expect = {
        "src/**/*.ts": {"src/a.ts", "src/sub/b.ts"},
        "src/*.ts": {"src/a.ts"},
        "*.ts": {"src/a.ts", "src/sub/b.ts", "lib/c.ts"},  # no `/`: a name, at any depth
        "b.ts": {"src/sub/b.ts"},
        "**/sub/*.ts": {"src/sub/b.ts"},
        "sub/*.ts": set(),  # a `/` anchors it at the workspace
        "/lib/*": {"lib/c.ts"},
    }
    for glob, files in expect.items():
        r = invoke(gw, "repo.search", {**base, "glob": glob})
        assert r.status_code == 200 and set(r.json()["files"]) == files, (glob, r.text)
    bad = invoke(gw, "repo.search", {**base, "glob": "src/a\\"})
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "glob", bad.text


def test_untracked_files_are_diffed_as_git_does_without_a_process_each(gw: Gateway) -> None:
    """Found by a review: repo.diff ran `git diff --no-index` once per untracked file (3,000 one-line files took
    13 s). The diff of each is built as git prints it: text, no final newline, empty, binary, a link, an
    executable, names git quotes; the tracked diff comes first, as before."""
    base, repo = {"workspace": "many"}, repo_of(gw, "many")
    (repo / "README.md").write_text("# changed\n")
    gen = repo / "gen"
    gen.mkdir()
    for i in range(200):
        (gen / f"f{i:03}.txt").write_text(f"line {i}\nsecond {i}\n")
    (gen / "no-newline.txt").write_text("last line")
    (gen / "empty.txt").write_text("")
    (gen / "data.bin").write_bytes(b"\x00\x01binary\xff")
    (gen / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (gen / "run.sh").chmod(0o755)
    (gen / "a name with spaces.txt").write_text("spaced\r\n")
    (gen / 'quo"te\\back.txt').write_text("quoted\n")
    (gen / "caf\u00e9.txt").write_text("caf\u00e9\n")
    os.symlink("/etc/passwd", gen / "link")
    (gen / "marked.txt").write_text("text git is told not to diff\n")
    (repo / ".gitattributes").write_text("gen/marked.txt -diff\n")
    before = git_runs(gw)
    d = invoke(gw, "repo.diff", base).json()
    runs = git_runs(gw) - before
    untracked = [f["path"] for f in d["files"] if f["status"] == "untracked"]
    assert len(untracked) == 210 and d["changed"] == 211, d["files"]
    env = {**os.environ, "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1"}
    expected = git(repo, "-c", "core.quotepath=off", "diff", "--no-ext-diff", "--no-textconv", "HEAD")
    for path in untracked:
        expected += subprocess.run(
            ["git", "-c", "core.quotepath=off", "diff", "--no-ext-diff", "--no-textconv", "--no-index", "--",
             "/dev/null", path], cwd=repo, capture_output=True, env=env,
        ).stdout.decode(errors="replace")  # fmt: skip
    assert d["diff"] == expected
    assert "Binary files /dev/null and b/gen/marked.txt differ" in d["diff"]
    assert 0 < runs < 10, f"{runs} git processes for one repo.diff"
    assert stat.S_ISLNK((gen / "link").lstat().st_mode)  # shown as a link, never followed
