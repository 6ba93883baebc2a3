"""Schemathesis over every operation of a real gateway, the per-capability ones included: server errors, and
where the schema and the validation disagree.

    python bench/fuzz.py [--examples 100] [--all]

For each operation, `--examples` generated cases (half valid, half invalid by the schema) run through
schemathesis' checks: `not_a_server_error` (no 5xx), `positive_data_acceptance` (a valid case is not refused
with a 4xx the schema does not document) and `negative_data_rejection` (an invalid case is refused).
Without `--all`, operations that stop plugins or run a model for seconds per valid case (LLM generation,
training, model loading, the sleep probes) are left out, as in the test suite. Prints one line per operation
with a failure, then a summary.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import negative_data_rejection, not_a_server_error, positive_data_acceptance

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from gateway_harness import ADMIN_KEY, start_gateway  # noqa: E402

SLOW = (
    "/stop", "/restart", "/revoke", "/rotate", "/admin/users/{user_id}",
    "/v1/chat/completions", "/v1/completions", "/v1/embeddings",
    "/llm.chat", "/llm.complete", "/llm.embed", "/llm.load", "/candle.run", "/candle.quantize", "/candle.load",
    "/brainml.ask", "/brainml.train", "/sysinfo.sleep", "/sysinfo.survey",
)  # fmt: skip
NAMES = {
    not_a_server_error: "5xx",
    positive_data_acceptance: "valid refused",
    negative_data_rejection: "invalid accepted",
}


def fuzz_operation(
    op: Any, mode: Any, checks: list[Any], examples: int, headers: dict[str, str], seen: Counter[str]
) -> int:
    """Run `examples` cases of one operation in one generation mode; count failed checks into `seen`."""
    calls = 0

    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(case=op.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        nonlocal calls
        calls += 1
        response = case.call(headers=headers, timeout=60)
        for check in checks:
            try:
                case.validate_response(response, checks=[check], headers=headers)
            except (Exception, BaseExceptionGroup):  # noqa: BLE001 - a failed check: counted, the run goes on
                seen[NAMES[check]] += 1

    with contextlib.suppress(Unsatisfiable):  # nothing to make invalid (an operation without input)
        run()
    return calls


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--examples", type=int, default=100)
    ap.add_argument("--all", action="store_true", help="also the operations that stop plugins or run models")
    args = ap.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    gw = start_gateway(Path(tempfile.mkdtemp(prefix="bench-fuzz-")) / "data")
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    failures: Counter[str] = Counter()
    by_op: dict[str, Counter[str]] = {}
    calls, ops = 0, 0
    t0 = time.monotonic()
    try:
        schema = schemathesis.openapi.from_url(gw.url + "/openapi.json")
        for result in schema.get_all_operations():
            op = result.ok()
            if not args.all and any(s in op.path for s in SLOW):
                continue
            ops += 1
            seen: Counter[str] = Counter()

            for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
                extra = (
                    positive_data_acceptance
                    if mode == schemathesis.GenerationMode.POSITIVE
                    else negative_data_rejection
                )
                calls += fuzz_operation(op, mode, [not_a_server_error, extra], args.examples // 2, headers, seen)
            if seen:
                by_op[f"{op.method.upper()} {op.path}"] = seen
                failures.update(seen)
    finally:
        gw.stop()
    for name, seen in sorted(by_op.items()):
        print(f"{name}: " + ", ".join(f"{k} x{v}" for k, v in seen.items()))
    took = time.monotonic() - t0
    print(f"\n{ops} operations, {calls:,} cases in {took:.0f}s: " + (", ".join(
        f"{len([1 for s in by_op.values() if k in s])} operations with '{k}' ({v} cases)" for k, v in failures.items()
    ) or "no failures"))  # fmt: skip


if __name__ == "__main__":
    main()
