"""torch.compile for a function called at several shapes, dtypes or closures (FlexAttention per mask layout, dtype
and head count), without dynamo's silent fallback: past `recompile_limit` (8) recompilations of one code object,
dynamo runs the function eagerly and says nothing, so a benchmark would time the uncompiled function.

    fns = CompiledPerKey(flex_attention)
    out = fns(("row", "fp16", 16), q, k, v, block_mask=bm)   # compiled for this key on first use
    fns.compiled[("row", "fp16", 16)]                          # True, or False with fns.errors[key]

Each key gets its own `torch.compile` callable; dynamo's recompile limits are raised to cover every key seen so
far, and hitting one is an error (`fail_on_recompile_limit_hit`), so a call either runs compiled or raises; a
key whose first call raises is marked not compiled and calls for it raise `NotCompiledError`.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import torch

GRAPHS_PER_KEY = 4
"""Recompilations allowed per key (forward, grad mode or a backward-only shape change): the limit is set to
8 + this times the number of keys."""


class NotCompiledError(RuntimeError):
    pass


class CompiledPerKey:
    def __init__(self, fn: Callable[..., Any], **compile_kwargs: Any) -> None:
        self.fn, self.compile_kwargs = fn, {"fullgraph": True, **compile_kwargs}
        self.callables: dict[Hashable, Callable[..., Any]] = {}
        self.compiled: dict[Hashable, bool] = {}
        """Key -> whether its calls run compiled (False: its first compilation failed, see `errors`)."""
        self.errors: dict[Hashable, str] = {}

    def _limits(self) -> dict[str, Any]:
        cfg = torch._dynamo.config
        n = 8 + GRAPHS_PER_KEY * len(self.callables)
        out: dict[str, Any] = {}
        if hasattr(cfg, "fail_on_recompile_limit_hit"):  # (absent from older torch: config.patch would raise)
            out["fail_on_recompile_limit_hit"] = True
        for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                     "accumulated_cache_size_limit"):  # fmt: skip
            if hasattr(cfg, name):  # (renamed across torch versions; the old names are aliases)
                out[name] = max(getattr(cfg, name), n)
        return out

    def __call__(self, key: Hashable, *args: Any, **kwargs: Any) -> Any:
        if self.compiled.get(key) is False:
            raise NotCompiledError(f"{key} did not compile: {self.errors[key]}")
        first = key not in self.callables
        if first:
            self.callables[key] = torch.compile(self.fn, **self.compile_kwargs)
        with torch._dynamo.config.patch(**self._limits()):
            try:
                out = self.callables[key](*args, **kwargs)
            except Exception as e:
                if not first:
                    raise
                self.compiled[key], self.errors[key] = False, f"{type(e).__name__}: {e}"
                raise NotCompiledError(f"{key} did not compile: {self.errors[key]}") from e
        self.compiled[key] = True
        return out
