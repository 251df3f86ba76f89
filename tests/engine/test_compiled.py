"""CompiledPerKey: one torch.compile callable per key, dynamo's recompile limit raised to cover them, and no silent
eager fallback (the FlexAttention rows of tools/bench_attention.py). dynamo's eager backend on the CPU."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from megadalle.engine.compiled import CompiledPerKey, NotCompiledError

KEYS = [(dtype, n) for dtype in (torch.float32, torch.float64, torch.int32, torch.int64) for n in (3, 5, 7)]


def _affine(x: torch.Tensor) -> torch.Tensor:
    return x * 2 + 1


def _affine_plain(x: torch.Tensor) -> torch.Tensor:
    return x * 2 + 1


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


def test_plain_torch_compile_stops_compiling_past_the_limit_silently() -> None:
    """The defect the helper exists for: 12 dtypes x shapes through one compiled function, fewer graphs than
    calls that needed one, and no error."""
    torch._dynamo.reset()
    fn = torch.compile(_affine_plain, backend="eager", dynamic=False)  # a graph per shape, as Flex per layout
    before = _graphs()
    for dtype, n in KEYS:
        x = torch.arange(n).to(dtype)
        assert torch.equal(fn(x), _affine_plain(x))
    assert _graphs() - before == torch._dynamo.config.recompile_limit < len(KEYS)


def test_every_key_runs_compiled() -> None:
    torch._dynamo.reset()
    fns = CompiledPerKey(_affine, backend="eager", dynamic=False)
    before = _graphs()
    for dtype, n in KEYS:
        x = torch.arange(n).to(dtype)
        assert torch.equal(fns((dtype, n), x), _affine(x))
        assert torch.equal(fns((dtype, n), x), _affine(x))  # the second call hits the compiled graph
    assert all(fns.compiled[k] for k in KEYS) and not fns.errors
    assert _graphs() - before == len(KEYS) > torch._dynamo.config.recompile_limit  # each key, past the default 8


def test_a_key_that_does_not_compile_is_reported() -> None:
    def breaks(x: torch.Tensor) -> torch.Tensor:
        return torch.tensor(x.tolist())  # a graph break: fullgraph refuses it

    fns = CompiledPerKey(breaks, backend="eager")
    with pytest.raises(NotCompiledError):
        fns("k", torch.ones(3))
    assert fns.compiled == {"k": False} and "k" in fns.errors
    with pytest.raises(NotCompiledError):
        fns("k", torch.ones(3))
