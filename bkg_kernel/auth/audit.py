"""The audit log and LLM usage: rows appended through the writer thread, read back in order, and forgotten after
their retention."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Any

from bkg_kernel.auth.base import AuthBase
from bkg_kernel.auth.principal import Principal
from bkg_kernel.auth.records import FORGET_BATCH, _now
from bkg_kernel.errors import InvalidInput


class AuditLog(AuthBase):
    """Audit entries and token usage: written, reported, forgotten."""

    # -- audit ------------------------------------------------------------------------------------
    def audit(self, actor: str | None, action: str, target: str | None = None, ok: bool = True, **detail: Any) -> None:
        """Append an audit entry (written in order by the writer thread; this returns at once)."""
        self._write_later(
            "INSERT INTO audit (created_at, actor, action, target, ok, detail) VALUES (?, ?, ?, ?, ?, ?)",
            [_now(), actor, action, target, ok, json.dumps(detail, default=str)],
        )

    def record_usage(self, p: Principal, route: str, model: str | None, prompt: int, completion: int) -> None:
        """Record one LLM request's exact token counts against the caller's key (and user); returns at once."""
        self._write_later(
            "INSERT INTO usage (created_at, key_id, user_id, username, route, model, prompt_tokens, completion_tokens) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [_now(), p.key_id, p.user_id, p.username, route, model, prompt, completion],
        )

    def book_usage(self, p: Principal, route: str, result: Any) -> None:
        """Record an LLM answer's token usage (OpenAI `usage`) against the caller: nothing when it has none, and
        a count that is not an integer counts 0 (the answer the caller already has never fails for this)."""
        usage = result.get("usage") if isinstance(result, dict) else None
        if not isinstance(usage, dict) or not usage:
            return
        count = [v if isinstance(v, int) and not isinstance(v, bool) else 0
                 for v in (usage.get("prompt_tokens"), usage.get("completion_tokens"))]  # fmt: skip
        self.record_usage(p, route, result.get("model"), count[0], count[1])

    def forget_old(self, key_days: float, audit_days: float, usage_days: float) -> dict[str, int]:
        """Delete what has been over for longer than its retention (0: kept for good): keys revoked or expired more
        than `key_days` ago (a notebook run's key, revoked as its run ends, among them), audit entries older than
        `audit_days`, usage rows older than `usage_days`; return how many of each went."""
        self.sync()  # what the writer holds goes in first
        now = _now()
        gone = {"keys": 0, "audit": 0, "usage": 0}
        with self.mutex:
            if key_days > 0:
                cut = now - timedelta(days=key_days)
                ids = {r["id"] for r in self._rows(
                    "SELECT id FROM api_keys WHERE revoked_at < ? OR expires_at < ?", [cut, cut])}  # fmt: skip
                if ids:
                    self.con.execute("DELETE FROM api_keys WHERE id IN (SELECT unnest(?::VARCHAR[]))", [sorted(ids)])
                    for k in [k for k in self.keys.values() if k.id in ids]:  # expired ones are still looked up
                        del self.keys[k.prefix]
                        self.key_ids.pop(k.id, None)
                gone["keys"] = len(ids)
        for table, days in (("audit", audit_days), ("usage", usage_days)):
            cut = now - timedelta(days=days)
            while days > 0:  # in batches, the lock let go between them: a first pass over years of rows never
                with self.mutex:  # holds every collection and login behind it
                    row = self.con.execute(
                        f"DELETE FROM {table} WHERE rowid IN "
                        f"(SELECT rowid FROM {table} WHERE created_at < ? LIMIT {FORGET_BATCH})",
                        [cut],
                    ).fetchone()
                n = int(row[0]) if row else 0  # DuckDB answers a DELETE with its count
                gone[table] += n
                if n < FORGET_BATCH:
                    break
        return gone

    def usage_report(self, group_by: str = "key", since: datetime | None = None) -> list[dict[str, Any]]:
        """Sum token usage per key, user, model, day or key and day (optionally since a time)."""
        cols = {
            "key": "key_id, username",
            "user": "user_id, username",
            "model": "model",
            "day": "CAST(created_at AS DATE) AS day",
            "key_day": "key_id, username, CAST(created_at AS DATE) AS day",
        }
        if group_by not in cols:
            raise InvalidInput(f"group_by must be one of {', '.join(cols)}, not {group_by!r}", field="group_by")
        where, params = ("WHERE created_at >= ?", [since]) if since else ("", [])
        sql = (
            f"SELECT {cols[group_by]}, count(*) AS requests, sum(prompt_tokens) AS prompt_tokens, "
            f"sum(completion_tokens) AS completion_tokens, sum(prompt_tokens + completion_tokens) AS total_tokens "
            f"FROM usage {where} GROUP BY ALL ORDER BY total_tokens DESC"
        )
        self.sync()
        with self.mutex:
            rows = self._rows(sql, params)
        for r in rows:
            if "day" in r:
                r["day"] = r["day"].isoformat()
        return rows

    def list_audit(self, limit: int = 100, action: str | None = None) -> list[dict[str, Any]]:
        """Return the newest audit entries, optionally of one action."""
        if not 1 <= limit <= 10_000:
            raise InvalidInput("limit must be from 1 to 10000", field="limit")
        where, params = ("WHERE action = ?", [action]) if action else ("", [])
        self.sync()
        with self.mutex:
            rows = self._rows(f"SELECT * FROM audit {where} ORDER BY id DESC LIMIT ?", [*params, limit])
        for r in rows:
            r["created_at"] = r["created_at"].isoformat() + "Z"
            r["detail"] = json.loads(r["detail"]) if r["detail"] else {}
        return rows
