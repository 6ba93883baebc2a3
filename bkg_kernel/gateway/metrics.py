"""Prometheus metrics: an ASGI middleware counts requests and latencies by route template."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from typing import Any

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """Counters and latency histograms, keyed by (method, route, status)."""

    def __init__(self) -> None:
        self.count: dict[tuple[str, str, int], int] = defaultdict(int)
        self.hist: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0] * (len(BUCKETS) + 1))
        self.total: dict[tuple[str, str], float] = defaultdict(float)
        self._lock = threading.Lock()

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        """Record one request (from the event loop, or a call port's thread)."""
        with self._lock:
            self.count[(method, route, status)] += 1
            h = self.hist[(method, route)]
            for i, b in enumerate(BUCKETS):
                if seconds <= b:
                    h[i] += 1
                    break
            else:
                h[-1] += 1
            self.total[(method, route)] += seconds

    def render(self, plugins: dict[str, Any]) -> str:
        """Return the Prometheus text exposition."""
        with self._lock:  # a call port's thread may add a series meanwhile
            count, total = dict(self.count), dict(self.total)
            hist = {k: list(v) for k, v in self.hist.items()}
        out = [
            "# HELP bkg_http_requests_total HTTP requests by route and status.",
            "# TYPE bkg_http_requests_total counter",
        ]
        for (m, r, s), n in sorted(count.items()):
            out.append(f'bkg_http_requests_total{{method="{m}",route="{r}",status="{s}"}} {n}')
        out += ["# HELP bkg_http_request_seconds HTTP request latency.", "# TYPE bkg_http_request_seconds histogram"]
        for (m, r), h in sorted(hist.items()):
            acc = 0
            for b, n in zip((*BUCKETS, float("inf")), h, strict=True):
                acc += n
                le = "+Inf" if b == float("inf") else f"{b:g}"
                out.append(f'bkg_http_request_seconds_bucket{{method="{m}",route="{r}",le="{le}"}} {acc}')
            out.append(f'bkg_http_request_seconds_sum{{method="{m}",route="{r}"}} {total[(m, r)]:.6f}')
            out.append(f'bkg_http_request_seconds_count{{method="{m}",route="{r}"}} {acc}')
        out += ["# HELP bkg_plugin_state 1 for the state each plugin is in.", "# TYPE bkg_plugin_state gauge"]
        for pid, p in sorted(plugins.items()):
            for st in ("stopped", "starting", "running", "stopping", "degraded", "error"):
                out.append(f'bkg_plugin_state{{plugin="{pid}",state="{st}"}} {int(p["state"] == st)}')
        for name, key, kind in (
            ("bkg_plugin_requests_total", "requests", "counter"),
            ("bkg_plugin_errors_total", "errors", "counter"),
            ("bkg_plugin_rss_bytes", "rss_bytes", "gauge"),
            ("bkg_plugin_queue_depth", "queue_depth", "gauge"),
        ):
            out += [f"# TYPE {name} {kind}"]
            out += [f'{name}{{plugin="{pid}"}} {p[key]}' for pid, p in sorted(plugins.items())]
        return "\n".join(out) + "\n"


class MetricsMiddleware:
    """Pure ASGI (no per-request task switching), so it costs microseconds."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 500

        async def send_wrapper(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            self.metrics.observe(scope["method"], path, status, time.perf_counter() - t0)
