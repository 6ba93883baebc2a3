"""The gateway's `points/scroll`, paged by `next_after` while points are upserted again between pages: every point
comes once, in the order first inserted (a point upserted again after the scroll passed it came back at the end: a
full scroll returned it twice). A real gateway on 127.0.0.1, real DuckDB and FAISS."""

from __future__ import annotations

from typing import Any

PLUGINS = ["sysinfo"]  # only the gateway's own routes are under test


def test_a_rest_scroll_returns_each_point_once_while_points_are_upserted_again(gw: Any) -> None:
    c = gw.client()
    base = "/api/collections/stable"
    assert c.post("/api/collections", json={"name": "stable", "dim": 2}).status_code == 201

    def put(ids: list[int], v: int) -> None:
        points = [{"id": i, "vector": [1, i + v], "payload": {"v": v}, "text": f"v{v}"} for i in ids]
        assert c.put(f"{base}/points", json={"points": points}).status_code == 200

    put(list(range(30)), 0)
    seen: list[dict[str, Any]] = []
    body: dict[str, Any] = {"limit": 10}
    for page_no in range(10):
        r = c.post(f"{base}/points/scroll", json=body)
        assert r.status_code == 200, r.text
        page = r.json()
        seen += page["points"]
        changed = [i for i in (10 * page_no, 10 * page_no + 9, 10 * page_no + 15, 29) if i < 30]
        put(changed, page_no + 1)  # read already, and not yet
        if page["next_after"] is None:
            break
        assert isinstance(page["next_after"], str)
        body = {"limit": 10, "after": page["next_after"]}
    assert [p["id"] for p in seen] == list(range(30))
    payloads = {p["id"]: p["payload"] for p in seen}
    assert payloads[15] == {"v": 1} and payloads[25] == {"v": 2} and payloads[29] == {"v": 2}
    whole = c.post(f"{base}/points/scroll", json={"limit": 100}).json()
    assert [p["id"] for p in whole["points"]] == list(range(30)) and whole["next_after"] is None
    for bad in ("s", "s-1", "s" + "9" * 20, "s9223372036854775808", "s\u00b2"):
        r = c.post(f"{base}/points/scroll", json={"after": bad})
        assert r.status_code == 422 and r.json()["error"]["field"] == "after", (bad, r.text)
