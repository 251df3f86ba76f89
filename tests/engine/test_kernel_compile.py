"""megadalle/engine/kernel_compile.py and tools/compile_kernels.py: the launched Triton kernel configurations compile
for sm_90 on the CPU (a subset here; .ci/run compiles them all), the table reports shared memory, registers and
spills, a variant over Hopper's shared memory fails, and the variants are keyed exactly as Triton's JIT keys
them (so --warm-cache fills the cache the GPU run reads). Subprocesses: the kernels must not be interpreted."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch

from kernels.block_sparse_attention import launch_config
from megadalle.engine.kernel_compile import DTYPES, HOPPER_SMEM, Result, Variant, preflight, summary, table
from tests.conftest import REPO, python


def _run(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([python(), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_a_subset_compiles_for_sm90_with_its_resources_reported(tmp_path) -> None:
    out = tmp_path / "kernels.json"
    proc = _run(["tools/compile_kernels.py", "--only", "gpu_check/bench_powersgd_kernels", "--jobs", "2",
                 "--json", str(out)])  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    r = json.loads(out.read_text())
    assert {row["kernel"] for row in r["rows"]} == {"_encode_kernel", "_decode_kernel", "_error_feedback_add_kernel",
                                                   "_decompress_update_kernel", "_householder_kernel"}  # fmt: skip
    for row in r["rows"]:
        assert row["ok"] and row["error"] is None, row
        assert 0 <= row["shared"] <= HOPPER_SMEM and 1 <= row["registers"] <= 255, row
        assert row["spill_stores"] >= 0 and row["spill_loads"] >= 0 and row["seconds"] > 0, row
        assert (row["num_warps"], row["num_stages"]) == (4, 3), row
        assert row["scenarios"] == ["gpu_check/bench_powersgd_kernels"], row
    assert r["summary"]["variants"] == len(r["rows"]) == 5 and r["summary"]["failed"] == 0
    assert "shared B" in proc.stdout and "5 variants, 0 failed" in proc.stdout


def test_the_launchers_choices_are_what_is_compiled() -> None:
    """The 1p3b prior's attention: its three layer kinds, forward, dK/dV and dQ, in each dtype, with the launcher's
    num_warps / num_stages (`launch_config`), and its matrix shards' PowerSGD kernels."""
    proc = _run(["tools/compile_kernels.py", "--list", "--only", "train/1p3b/*", "train/powersgd/1p3b/r112"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [line.split() for line in proc.stdout.splitlines()[1:]]
    attention = [w for w in lines if w[0] in ("_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel")]
    assert len(attention) == 3 * 3 * 3  # kinds x kernels x dtypes
    for w in attention:
        chosen = launch_config(DTYPES[w[1]], 64)
        assert f"{chosen['num_warps']}/{chosen['num_stages']}" in w, w
        assert "BLOCK=64" in w and "BLOCK_D=64" in w, w
    assert {w[0] for w in lines} - {w[0] for w in attention} == {"_error_feedback_add_kernel", "_decode_kernel",
                                                                 "_encode_kernel", "_decompress_update_kernel",
                                                                 "_householder_kernel"}  # fmt: skip


def test_variants_have_the_jits_cache_keys() -> None:
    """The ASTSource and options of each variant hash as those JITFunction.run builds from the same launch
    (the cache key's parts): compiling with --warm-cache is compiling what the GPU run will look up."""
    code = """
from triton.compiler import ASTSource
from triton.compiler.compiler import make_backend
import megadalle.engine.kernel_compile as ck
backend = make_backend(ck.target())
n = 0
for kernel, module, name, args, kwargs in ck.record("gpu_check/bench_train_gpu") + ck.record("train/codec"):
    options, signature, constexprs, attrs = ck.specialise(backend, kernel, args, kwargs)
    v = ck.variant(module, name, options, signature, constexprs, attrs)
    assert v.source().hash() == ASTSource(kernel, signature, constexprs, attrs).hash(), name
    assert backend.parse_options(dict(v.options)).hash() == backend.parse_options(options.__dict__).hash(), name
    n += 1
print("launches", n)
"""
    proc = _run(["-c", code])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert int(proc.stdout.split()[-1]) > 9


def test_over_hoppers_shared_memory_or_a_compile_error_fails() -> None:
    v = Variant("kernels.x", "_k", (("X", "*fp16"), ("N", "i32")), (), (), (("num_stages", 3), ("num_warps", 4)))
    fine = Result(v, 1.0, shared=HOPPER_SMEM, registers=128, spill_stores=0, spill_loads=0)
    over = Result(v, 1.0, shared=HOPPER_SMEM + 1, registers=128, spill_stores=0, spill_loads=0)
    broken = Result(v, 1.0, error="CompilationError: at 3:4: ...")
    assert fine.ok and not over.ok and not broken.ok
    s = summary([fine, over, broken])
    assert s["failed"] == 2 and s["max_shared"] == HOPPER_SMEM + 1 and s["variants"] == 3
    text = table([fine, over, broken])
    assert f"shared > {HOPPER_SMEM}" in text and "CompilationError" in text


def test_preflight_says_what_is_missing_without_a_gpu() -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: gpu_check.sh runs the preflight itself")
    with pytest.raises(RuntimeError, match="no CUDA device"):
        preflight()
