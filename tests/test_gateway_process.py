"""The gateway process stays small: DuckDB's optional pandas probe is refused there, nothing else changes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = """
import sys
from bkg_kernel.gateway.server import keep_pandas_out
keep_pandas_out()
from bkg_kernel.store import Store
s = Store(sys.argv[1])
c = s.create_collection("docs", dim=3)
c.upsert([
    {"id": 1, "vector": [1, 0, 0], "payload": {"lang": "en"}, "text": "hello world"},
    {"id": 2, "vector": [0, 1, 0], "payload": {"lang": "de"}, "text": "guten tag"},
    {"id": 3, "vector": [0, 0, 1], "payload": {"lang": "fr"}, "text": "bonjour"},
])
hits = c.query(vector=[1, 0, 0], k=1, filter={"lang": "en"})
assert [h.id for h in hits] == [1], hits
assert c.query(text="world", k=1, mode="text")[0].id == 1
assert "pandas" not in sys.modules, "DuckDB loaded pandas in the gateway process"
try:
    import pandas  # noqa: F401
except ModuleNotFoundError as e:
    print("refused:", e)
s.close()
"""


def test_gateway_process_refuses_pandas_and_the_store_still_works(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "data")], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "refused: pandas is not loaded in the bkg gateway process" in out.stdout


def test_gateway_keeps_pandas_if_already_imported() -> None:
    script = "import pandas, sys\nfrom bkg_kernel.gateway.server import keep_pandas_out, PandasBlocker\n"
    script += "keep_pandas_out()\nassert not any(isinstance(f, PandasBlocker) for f in sys.meta_path)\n"
    script += "import pandas.io.json\nprint('ok')"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
