"""The CLI names the option the user typed, not the request field the gateway's error names: `bkg plugins logs X
--limit 0` said `query.limit: ...`, `bkg keys create k --rate-limit 0` said `rate_limit_per_min`, `bkg jobs schedule
... --tz X` said `timezone`. The HTTP API's answers are unchanged."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from gateway_harness import ADMIN_KEY, Gateway, start_gateway
from helpers import bkg, notebook, one_line_error


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    roots = tmp_path_factory.mktemp("msgsroots")
    notebook(roots / "hello.ipynb", "n = 1", "print(n)")  # schedule's options are checked once its notebook is found
    g = start_gateway(tmp_path_factory.mktemp("msgs") / "data", env={"BKG_JOB_ROOTS": str(roots)},
                      plugins=["apikeys"])  # fmt: skip
    yield g
    g.stop()


def test_an_option_the_gateway_refuses_is_named_as_typed(gw: Gateway, tmp_path: Path) -> None:
    cron = "0 3 * * *"
    cases = [  # (the command, what it says first, the wire field it said first)
        (["plugins", "logs", "apikeys", "--limit", "0"], "--limit: ", "query.limit"),
        (["plugins", "logs", "apikeys", "--limit", "5000"], "--limit: ", "query.limit"),
        (["plugins", "logs", "apikeys", "--level", "!!"], "--level: ", "query.level"),
        (["keys", "create", "k1", "--rate-limit", "0"], "--rate-limit: ", "rate_limit_per_min"),
        (["keys", "create", "k1", "--expires-in-days", "-1"], "--expires-in-days: ", "expires_in_days"),
        (["keys", "create", "k1", "--user", "nobody"], "--user: no user 'nobody'", "user_id"),
        (["keys", "create", "k1", "--scope", "plugins:read", "--scope", "no:such"], "--scope 'no:such': ", "scopes.1"),
        (["users", "create", "u1", "--role", "nope"], "--role: no role 'nope'", "role"),
        (["users", "create", "u2", "--password", "short"], "--password: ", "password"),
        (["users", "passwd", "admin", "--password", "short"], "--password: ", "password"),
        (["jobs", "list", "--before", "no such run"], "--before: ", "query.before"),
        (["jobs", "run", "hello.ipynb", "--timeout", "-1"], "--timeout: ", "timeout_s"),
        (["jobs", "run", "hello.ipynb", "--retries", "100"], "--retries: ", "retries"),
        (["jobs", "schedule", "hello.ipynb", cron, "--tz", "Nowhere/X"], "--tz: ", "timezone"),
        (["jobs", "schedule", "hello.ipynb", cron, "--webhook", "ftp://x"], "--webhook must be", "webhook_url"),
        (["jobs", "schedule", "hello.ipynb", cron, "--timeout", "0"], "--timeout: ", "timeout_s"),
    ]
    for args, said, wire in cases:
        r = bkg(*args, "--url", gw.url, cwd=tmp_path, BKG_API_KEY=ADMIN_KEY)
        one_line_error(r, said)
        assert not r.stderr.startswith(f"error: {wire}"), (args, r.stderr)
    c = gw.client()
    assert [k for k in c.get("/admin/keys").json()["keys"] if k["name"] == "k1"] == []  # nothing was made
    # a positional argument's field is the argument's own name: kept, as the messages of the other commands
    one_line_error(bkg("keys", "revoke", "nope", "--url", gw.url, cwd=tmp_path, BKG_API_KEY=ADMIN_KEY), "key_id: ")
    r = bkg("jobs", "schedule", "hello.ipynb", "3 * *", "--url", gw.url, cwd=tmp_path, BKG_API_KEY=ADMIN_KEY)
    one_line_error(r, "cron: a cron is five fields")
    # the HTTP API still names its own fields
    r = c.get("/api/plugins/apikeys/logs", params={"limit": 0})
    assert r.status_code == 422 and r.json()["error"]["field"] == "query.limit", r.text
    r = c.post("/admin/keys", json={"name": "k2", "rate_limit_per_min": 0})
    assert r.status_code == 422 and r.json()["error"]["field"] == "rate_limit_per_min", r.text
