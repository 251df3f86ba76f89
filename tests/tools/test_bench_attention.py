"""tools/bench_attention.py's GPU report without a GPU: the table marks the rows whose Flex did not compile (their
ratio would time eager Flex), and the JSON is written as rows come in (gpu_check keeps them when the step times
out). The compiled-Flex bookkeeping itself: tests/engine/test_compiled.py."""

from __future__ import annotations

import json
import runpy

from tests.conftest import REPO


def _row(layout: str, compiled: bool) -> dict:
    return {"layout": layout, "heads": 16, "dtype": "fp16", "pass": "fwd", "ms": {"triton": 1.0, "sdpa_causal": 2.0,
            "flex": 1.5 if compiled else float("nan")}, "tflops": 100.0, "x_sdpa_causal": 2.0,
            "flex_compiled": compiled, "x_flex": 1.5 if compiled else None}  # fmt: skip


def test_rows_without_compiled_flex_say_so_and_partial_json(tmp_path) -> None:
    bench = runpy.run_path(str(REPO / "tools" / "bench_attention.py"))  # its functions, not its main
    rows = [_row("row", True), _row("column", False)]
    table = bench["format_rows"](rows).splitlines()
    assert "x flex" in table[0] and table[1].rstrip().endswith("1.50x")
    assert table[2].rstrip().endswith("not compiled") and "nan" not in table[2]
    out = tmp_path / "a.json"
    bench["_write"](str(out), "GPU", rows[:1])
    first = json.loads(out.read_text())
    assert first["complete"] is False and len(first["rows"]) == 1 and "1.50x" in first["table"]
    bench["_write"](str(out), "GPU", rows, done=True)
    assert json.loads(out.read_text())["complete"] is True
