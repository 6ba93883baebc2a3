"""A process SIGKILLed in the middle of a batch upsert loses nothing it acknowledged."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

from bkg_kernel.store import Store

WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    from bkg_kernel.store import Store
    s = Store(sys.argv[1])
    c = s.create_collection("docs", dim=32, index=sys.argv[2])
    rng = np.random.default_rng(0)
    for b in range(10_000):
        ids = [b * 1000 + i for i in range(1000)]
        c.upsert(ids=ids, vectors=rng.normal(size=(1000, 32)), payloads=[{"batch": b}] * 1000,
                 texts=[f"batch {b}"] * 1000, batch_size=250)
        print(b, flush=True)  # acknowledged: upsert returned
""")


def _run_and_kill(data_dir: Path, kind: str, acks_wanted: int) -> int:
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(data_dir), kind], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    last = -1
    for line in proc.stdout:
        last = int(line)
        if last + 1 >= acks_wanted:
            break
    os.kill(proc.pid, signal.SIGKILL)  # mid-way through the next batch
    proc.wait()
    return last


def test_sigkill_mid_ingest_keeps_acknowledged_batches(data_dir: Path) -> None:
    for kind in ("flat", "hnsw"):
        d = data_dir / kind
        last = _run_and_kill(d, kind, acks_wanted=4)
        assert last >= 3
        with Store(d) as s:
            c = s["docs"]
            for b in range(last + 1):
                assert c.count({"batch": b}) == 1000, (kind, b)
            total = c.count()
            assert total >= (last + 1) * 1000 and total % 250 == 0  # only whole committed sub-batches
            rng = np.random.default_rng(0)
            v0 = rng.normal(size=(1000, 32))
            assert c.query(v0[17], k=1).ids == [17]  # the index was recovered too
            assert len(c.query(text="batch", k=5)) == 5
            assert c._ensure_index().ntotal == total
