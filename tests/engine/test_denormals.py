"""flush_denormals: subnormal floats become 0 in the thread pool that torch starts after the call, when it is called
after the entry points' imports, as their main() does."""

from __future__ import annotations

import subprocess
import sys

PROGRAM = """
import sys, torch
import megadalle.sample, megadalle.train  # the entry points' imports start no thread pool before the call
from megadalle.engine.denormals import flush_denormals
if sys.argv[1] == "1":
    assert flush_denormals()
torch.set_num_threads(2)
x = torch.full((1 << 22,), 1e-39)  # (N,) subnormal float32, multiplied in chunks on every pool thread
y = x * 2  # ~2e-39, still subnormal: kept, or flushed to 0
print(int(torch.count_nonzero(y)), y.numel())
"""


def _nonzero(flush: bool) -> tuple[int, int]:
    out = subprocess.run([sys.executable, "-c", PROGRAM, str(int(flush))], capture_output=True, text=True, check=True)
    nonzero, total = map(int, out.stdout.split())
    return nonzero, total


def test_flush_reaches_every_pool_thread_and_only_with_the_call():
    nonzero, total = _nonzero(flush=False)
    assert nonzero == total  # the default keeps subnormals: the control
    assert _nonzero(flush=True) == (0, total)  # with it, no chunk on any thread keeps one
