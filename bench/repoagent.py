"""repoagent: index speed, incremental re-index, retrieval recall@5 and citation validity on a real package,
side by side with LanceDB over the same files, in one run.

    python bench/repoagent.py [--package requests] [--rounds 3]

Corpus: the installed source of `--package` (copied out of site-packages into a git repository in a temp
dir, so touching a file leaves the installed package alone). Rows:

- bkg: `repo.index` through a real gateway (ast symbols and references, one chunk per symbol, embedded by
  candle with all-MiniLM-L6-v2 into the store with BM25 text); retrieval = the sources `repo.ask` gives the
  model (hybrid + symbols named in the question), answered by the default SmolLM2.
- lancedb: what a generic RAG does with the same files: 60-line windows (10 shared), the same model
  (sentence-transformers in this process), LanceDB's FTS and hybrid search with its RRF reranker.

Quality: `QUESTIONS` (hand-written, none names its function); a hit is a retrieved chunk whose line span
overlaps the function that answers the question. Citation validity: the share of `repo.ask` citations whose
lines exist and hold the code they cite, checked again here against the files.
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from gateway_harness import ADMIN_KEY, start_gateway  # noqa: E402

from bkg_kernel.models.defaults import DEFAULT_EMBEDDER  # noqa: E402
from bkg_kernel.models.registry import ModelRegistry  # noqa: E402

warnings.filterwarnings("ignore")
WINDOW, OVERLAP = 60, 10
# (question, file, qualified name of the function that answers it), about requests 2.x
QUESTIONS = [
    ("Where are proxy settings read from the environment variables?", "utils.py", "get_environ_proxies"),
    ("How is the text encoding guessed from the Content-Type header?", "utils.py", "get_encoding_from_headers"),
    ("Where does a session follow HTTP redirects?", "sessions.py", "SessionRedirectMixin.resolve_redirects"),
    ("When must the Authorization header be dropped on a redirect to another host?", "sessions.py",
     "SessionRedirectMixin.should_strip_auth"),
    ("How is the header value for HTTP Basic authentication built?", "auth.py", "_basic_auth_str"),
    ("How is the digest authentication response header computed?", "auth.py", "HTTPDigestAuth.build_digest_header"),
    ("Where is the body of a response decoded as JSON?", "models.py", "Response.json"),
    ("Which method raises an HTTPError for client and server error status codes?", "models.py",
     "Response.raise_for_status"),
    ("How is a dict of query parameters encoded into a query string?", "models.py",
     "RequestEncodingMixin._encode_params"),
    ("How are uploaded files encoded as a multipart form body?", "models.py", "RequestEncodingMixin._encode_files"),
    ("Where does the adapter create its urllib3 pool manager?", "adapters.py", "HTTPAdapter.init_poolmanager"),
    ("Where are TLS certificate verification and the CA bundle set on a connection?", "adapters.py",
     "HTTPAdapter.cert_verify"),
    ("How is the response body streamed in chunks?", "models.py", "Response.iter_content"),
    ("Where are cookies taken from a response and stored in the cookie jar?", "cookies.py",
     "extract_cookies_to_jar"),
    ("How are credentials for a host looked up in the netrc file?", "utils.py", "get_netrc_auth"),
    ("How is a URL quoted again so that it is safe?", "utils.py", "requote_uri"),
    ("How is the Link header parsed into a list of links?", "utils.py", "parse_header_links"),
    ("Where are the default request headers such as the User-Agent made?", "utils.py", "default_headers"),
    ("How are session-level settings merged with the settings of one request?", "sessions.py", "merge_setting"),
    ("How are the registered hooks called for a response?", "hooks.py", "dispatch_hook"),
    ("How does the adapter turn a urllib3 response into a Response object?", "adapters.py",
     "HTTPAdapter.build_response"),
    ("How is the length of a string or file-like body worked out?", "utils.py", "super_len"),
    ("Where are the proxy headers with Proxy-Authorization built?", "adapters.py", "HTTPAdapter.proxy_headers"),
    ("How does a session decide whether to trust environment settings like proxies and certificates?",
     "sessions.py", "Session.merge_environment_settings"),
]  # fmt: skip


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=b", "-c", "user.email=b@x", *args], cwd=repo, check=True,
                   capture_output=True)  # fmt: skip


def wait(c: Any, r: Any) -> dict[str, Any]:
    r.raise_for_status()
    job_id = r.json()["job"]["id"]
    while True:
        j = c.get(f"/api/jobs/{job_id}").json()
        if j["finished"] is not None:
            if j["state"] != "done":
                raise SystemExit(f"job failed: {j['error']}")
            return dict(j["result"])
        time.sleep(0.05)


def spans_of(root: Path) -> dict[tuple[str, str], tuple[int, int]]:
    """Line spans of every function by (file, qualname), from this run's own ast walk (the answer key)."""
    import ast

    out: dict[tuple[str, str], tuple[int, int]] = {}
    for f in root.rglob("*.py"):
        rel = f.relative_to(root).as_posix()

        def walk(node: ast.AST, prefix: str, rel: str = rel) -> None:
            for ch in ast.iter_child_nodes(node):
                if isinstance(ch, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    q = f"{prefix}{ch.name}"
                    start = min([ch.lineno, *(d.lineno for d in ch.decorator_list)])
                    out[(rel, q)] = (start, ch.end_lineno or ch.lineno)
                    walk(ch, q + ".", rel)

        walk(ast.parse(f.read_text()), "")
    return out


def windows(root: Path) -> list[dict[str, Any]]:
    """60-line windows of every .py file, 10 lines shared."""
    out = []
    for f in sorted(root.rglob("*.py")):
        lines = f.read_text().splitlines()
        rel = f.relative_to(root).as_posix()
        for a in range(0, max(len(lines), 1), WINDOW - OVERLAP):
            b = min(len(lines), a + WINDOW)
            out.append({"path": rel, "start": a + 1, "end": b, "text": f"{rel}\n" + "\n".join(lines[a:b])})
            if b >= len(lines):
                break
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--package", default="requests")
    ap.add_argument("--rounds", type=int, default=3, help="Re-index rounds after touching one file.")
    args = ap.parse_args()
    src = Path(importlib.import_module(args.package).__file__ or "").parent
    work = Path(tempfile.mkdtemp(prefix="bkg-bench-repo-"))
    repo = work / "repos" / args.package
    shutil.copytree(src, repo, ignore=shutil.ignore_patterns("__pycache__"))
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "import")
    files = sorted(repo.rglob("*.py"))
    n_lines = sum(len(f.read_text().splitlines()) for f in files)
    print(f"corpus: {args.package} from {src}: {len(files)} Python files, {n_lines} lines")
    key = spans_of(repo)
    missing = [(f, q) for _, f, q in QUESTIONS if (f, q) not in key]
    if missing:
        raise SystemExit(f"answer key not found in this version of {args.package}: {missing}")

    gw = start_gateway(work / "data")
    try:
        import httpx

        c = httpx.Client(base_url=gw.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=600)
        cfg = c.get("/api/plugins/repoagent/config").json()["config"]
        c.put("/api/plugins/repoagent/config", json={"config": {**cfg, "repo_roots": [str(work / "repos")]}})
        inv = "/api/plugins/repoagent/invoke/"
        c.post(inv + "repo.workspace", json={"action": "add", "name": "bench", "path": args.package}).raise_for_status()
        # warm the embedder and the LLM so that neither side pays a model load in its timing
        c.post("/v1/embeddings", json={"input": ["warm up"], "model": f"candle:{DEFAULT_EMBEDDER}"})
        c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})

        t0 = time.perf_counter()
        first = wait(c, c.post(inv + "repo.index", json={"workspace": "bench"}))
        bkg_index = time.perf_counter() - t0
        print(f"bkg: indexed {first['files']} files, {first['symbols']} symbols, {first['refs']} references, "
              f"{first['chunks']} chunks in {bkg_index:.2f} s {first['timings']}")  # fmt: skip

        touched = []
        target = repo / "utils.py"
        for i in range(args.rounds):  # a line inside the first function: its chunk changes, later ones move
            lines = target.read_text().splitlines(keepends=True)
            at = next(n for n, ln in enumerate(lines) if ln.startswith("def ")) + 1
            target.write_text("".join([*lines[:at], f"    # touched {i}\n", *lines[at:]]))
            t0 = time.perf_counter()
            again = wait(c, c.post(inv + "repo.index", json={"workspace": "bench"}))
            touched.append(time.perf_counter() - t0)
            assert again["changed"] == ["utils.py"] and again["embedded"] == 1, again
        git(repo, "checkout", "-q", "--", ".")
        wait(c, c.post(inv + "repo.index", json={"workspace": "bench"}))  # back to the committed lines

        from sentence_transformers import SentenceTransformer

        reg = ModelRegistry(gw.data_dir.parent / "models")
        st = SentenceTransformer(str(reg.resolve(DEFAULT_EMBEDDER)), device="cpu")
        import lancedb
        from lancedb.rerankers import RRFReranker

        t0 = time.perf_counter()
        wins = windows(repo)
        vecs = st.encode([w["text"] for w in wins], batch_size=64, normalize_embeddings=True)
        db = lancedb.connect(str(work / "lance"))
        table = db.create_table("code", data=[{**w, "vector": v} for w, v in zip(wins, vecs, strict=True)])
        table.create_fts_index("text", use_tantivy=False)
        lance_index = time.perf_counter() - t0
        print(f"lancedb: {len(wins)} windows embedded and indexed in {lance_index:.2f} s")

        def hit(chunks: list[tuple[str, int, int]], path: str, qual: str) -> bool:
            a, b = key[(path, qual)]
            return any(p == path and s <= b and e >= a for p, s, e in chunks)

        bkg_hits = lance_hits = bkg_lines = lance_lines = 0
        cites = valid = dropped = 0
        ask_s: list[float] = []
        for q, path, qual in QUESTIONS:
            t0 = time.perf_counter()
            r = c.post(inv + "repo.ask", json={"workspace": "bench", "question": q, "top_k": 5})
            if r.status_code != 200:
                raise SystemExit(f"repo.ask failed: {r.text}")
            ask_s.append(time.perf_counter() - t0)
            out = r.json()
            got = [(s["path"], s["start"], s["end"]) for s in out["sources"]]
            bkg_hits += hit(got, path, qual)
            bkg_lines += sum(e - s + 1 for _, s, e in got)
            if not hit(got, path, qual):
                print(f"bkg missed {path}:{qual} for {q!r}: got {[s['symbol'] for s in out['sources']]}")
            for cit in out["citations"]:
                cites += 1
                lines = (repo / cit["path"]).read_text().splitlines()
                valid += cit["end"] <= len(lines) and "\n".join(lines[cit["start"] - 1 : cit["end"]]) == cit["code"]
            dropped += len(out["dropped"])
            qv = st.encode([q], normalize_embeddings=True)[0]
            res = table.search(query_type="hybrid").vector(qv).text(q).rerank(RRFReranker()).limit(5).to_list()
            lance_got = [(x["path"], x["start"], x["end"]) for x in res]
            lance_hits += hit(lance_got, path, qual)
            lance_lines += sum(e - s + 1 for _, s, e in lance_got)
            if not hit(lance_got, path, qual):
                print(f"lancedb missed {path}:{qual} for {q!r}")
        n = len(QUESTIONS)
        per_touch = statistics.median(touched)
        print()
        print(f"| {args.package} ({len(files)} files, {n_lines} lines) | bkg repoagent | LanceDB, 60-line windows | "
              "bkg / LanceDB |")  # fmt: skip
        print("| --- | --- | --- | --- |")
        print(
            f"| index (parse + embed + store) | {bkg_index:.2f} s ({len(files) / bkg_index:.0f} files/s) | "
            f"{lance_index:.2f} s ({len(files) / lance_index:.0f} files/s) | {bkg_index / lance_index:.2f}x |"
        )
        print(f"| re-index after touching one file (median of {args.rounds}) | {per_touch:.2f} s | - | - |")
        print(
            f"| recall@5 ({n} questions) | {bkg_hits / n:.2f} | {lance_hits / n:.2f} | "
            f"{(bkg_hits / n) / max(lance_hits / n, 1e-9):.2f}x |"
        )
        print(f"| lines of code retrieved per question (what the model must read) | {bkg_lines / n:.0f} | "
              f"{lance_lines / n:.0f} | {bkg_lines / max(lance_lines, 1):.2f}x |")  # fmt: skip
        print(f"| repo.ask citation validity | {valid}/{cites} held ({dropped} dropped before answering) | - | - |")
        print(f"| repo.ask latency p50 (retrieval + SmolLM2-135M answer) | {statistics.median(ask_s):.2f} s | - | - |")
    finally:
        gw.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
