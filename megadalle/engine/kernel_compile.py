"""Ahead-of-time compilation of every Triton kernel configuration the project launches, for Hopper (sm_90), on
the CPU with Triton's own compiler (`triton.compile` with `GPUTarget("cuda", 90, 32)`; ptxas ships in the wheel),
so that a kernel that cannot build for an H100 / H200, or needs more shared memory than one has, fails in CI.

What is compiled is what the launchers choose, not a copy of their constants: each scenario below calls the real
launchers (kernels/block_sparse_attention.py through the prior's `AttentionBlock`, kernels/powersgd.py's
`encode`, `decode`, `error_feedback_add_`, `decompress_update_`, `orthogonalize`) on meta tensors of the real
shapes and strides, with the `@triton.jit` kernels swapped for recorders. Each recorded launch is specialised
exactly as Triton's JIT specialises it on a GPU (the same binder: dtypes, integers divisible by 16 or equal to 1,
16-byte aligned pointers, the constexprs and num_warps / num_stages the launcher passed), and the distinct
variants are compiled in a process pool. Because the specialisation and options are the JIT's own, the cache
keys are too: compiling into Triton's cache on a GPU machine (`cache_dir=None`) warms it for the tests and
benchmarks that follow (tools/gpu_check.sh).

Scenarios (name -> launches):
    train/<flavor>/<dtype>    the prior's attention layers (each kind of the flavor's layer schedule), forward
                              and backward, q, k, v as strided views of the qkv projection (12b, 1p3b; fp16, bf16,
                              fp32)
    train/powersgd/<flavor>/r<r>  PowerSGD's kernels on the flavor's resblock matrix shards (8 GPUs a node) in
                              both 16-bit formats, r a GPU: 16, 112 (the paper's 896 over 8) and 896 (a node group
                              of one; at 1p3b no shard compresses at 896)
    train/codec               the codec and error feedback on sizes 1, odd and divisible by 16 (Adam's moments,
                              the 16-bit all-reduce's chunks), both formats
    gpu_check/<step>          what each step of tools/gpu_check.sh launches (the gpu-marked tests, the benchmarks)
Sampling launches no Triton kernel (incremental decoding attends with SDPA over the KV cache). Not compiled: a
pointer that is not 16-byte aligned (the same code with narrower loads; the JIT compiles it if it ever happens).

    variants = collect(scenario_names)          # list[Variant], deduplicated, each with the scenarios using it
    results = compile_all(variants, jobs=2)      # list[Result]: shared memory, registers, spills, seconds, error
    preflight()                                  # on a GPU machine: one trivial kernel compiled and launched

The environment must not set TRITON_INTERPRET=1 (the kernels must be real `JITFunction`s).
"""

from __future__ import annotations

import contextlib
import fnmatch
import importlib
import io
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from typing import Any

import torch
import triton
import triton.language as tl

SM = 90
HOPPER_SMEM = 232_448
"""Bytes of shared memory one thread block may use on sm_90 (227 KiB, the opt-in maximum)."""
KERNEL_MODULES = ("kernels.block_sparse_attention", "kernels.powersgd")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def target() -> Any:
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", SM, 32)


# --- recording launches -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """One compilation: the kernel (module, name), its specialised signature, constexprs and attributes (as the
    JIT builds them), the compile options (num_warps, num_stages, ...) and which scenarios launch it."""

    module: str
    name: str
    signature: tuple[tuple[str, str], ...]
    constexprs: tuple[tuple[tuple[int, ...], Any], ...]
    attrs: tuple[tuple[tuple[int, ...], tuple], ...]
    options: tuple[tuple[str, Any], ...]
    scenarios: tuple[str, ...] = field(default=(), compare=False)

    @property
    def key(self) -> tuple:
        return (self.module, self.name, self.signature, self.constexprs, self.attrs, self.options)

    @property
    def num_warps(self) -> int:
        return dict(self.options)["num_warps"]

    @property
    def num_stages(self) -> int:
        return dict(self.options)["num_stages"]

    def source(self) -> Any:
        """The ASTSource Triton's JIT builds for this launch (its hash is the cache key's source part)."""
        from triton.compiler import ASTSource

        kernel = getattr(importlib.import_module(self.module), self.name)
        attrs = {k: [list(a) for a in x] for k, x in self.attrs}
        return ASTSource(kernel, dict(self.signature), dict(self.constexprs), attrs)

    def config(self) -> str:
        """Readable: the first pointer's dtype, the constexprs (declared and specialised), the integer arguments
        not divisible by 16 (the JIT compiles them apart from the divisible ones)."""
        names = [n for n, _ in self.signature]
        types = dict(self.signature)
        dtype = next((t[1:] for t in types.values() if t.startswith("*")), "-")
        consts = " ".join(f"{names[p[0]]}={int(v) if isinstance(v, bool) else v}" for p, v in self.constexprs)
        attrs = dict(self.attrs)
        plain = [names[p[0]] for p, a in attrs.items() if types[names[p[0]]].startswith("i") and not a]
        ptrs = [names[p[0]] for p, a in attrs.items() if types[names[p[0]]].startswith("*") and not a]
        out = f"{dtype} {consts}"
        if plain:
            out += " | %16!=0: " + ",".join(plain)
        if ptrs:
            out += " | unaligned: " + ",".join(ptrs)
        return out


class _Recorder:
    """Stands in for a `@triton.jit` kernel: `kernel[grid](*args, **kwargs)` records the launch."""

    def __init__(self, kernel: Any, module: str, name: str, calls: list) -> None:
        self.kernel, self.module, self.name, self.calls = kernel, module, name, calls

    def __getitem__(self, grid: Any) -> Callable[..., None]:
        def launch(*args: Any, **kwargs: Any) -> None:
            self.calls.append((self.kernel, self.module, self.name, args, kwargs))

        return launch


@contextlib.contextmanager
def _recording() -> Iterator[list]:
    """Swap every JITFunction of KERNEL_MODULES for a recorder (and let the launchers take meta tensors);
    yields the list the launches are appended to."""
    from triton.runtime.jit import JITFunction

    import kernels.block_sparse_attention as bsa
    import megadalle.models.attention as attention

    calls: list = []
    saved: list[tuple[Any, str, Any]] = []
    for mod_name in KERNEL_MODULES:
        mod = importlib.import_module(mod_name)
        for name, obj in list(vars(mod).items()):
            if type(obj).__name__ == "InterpretedFunction":
                raise RuntimeError("TRITON_INTERPRET=1 is set: the kernels are interpreted; unset it to compile them")
            if isinstance(obj, JITFunction):
                saved.append((mod, name, obj))
                setattr(mod, name, _Recorder(obj, mod_name, name, calls))
    # meta tensors are neither CUDA nor interpreted: skip the launchers' device checks while recording
    saved += [(bsa, "_check", bsa._check), (attention, "triton_usable", attention.triton_usable),
              (torch, "is_autocast_enabled", torch.is_autocast_enabled)]  # fmt: skip
    bsa._check = lambda *a, **k: None
    attention.triton_usable = lambda device: True
    autocast = torch.is_autocast_enabled  # autocast knows no meta device (the model's LayerNorm and Linear ask)
    torch.is_autocast_enabled = lambda *a: False if a and str(a[0]) == "meta" else autocast(*a)
    try:
        yield calls
    finally:
        for mod, name, obj in saved:
            setattr(mod, name, obj)


def specialise(backend: Any, kernel: Any, args: tuple, kwargs: dict) -> tuple:
    """(options, signature, constexprs, attrs) exactly as JITFunction.run computes them for this launch."""
    from triton import knobs
    from triton.runtime.jit import create_function_from_signature

    kwargs = dict(kwargs)
    kwargs["debug"] = kwargs.get("debug", kernel.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    return kernel._pack_args(backend, kwargs, bound, specialization, options)


# --- scenarios ----------------------------------------------------------------------------------------------------


def _meta(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def _attention(shape: tuple[int, ...], dtype: torch.dtype, kinds: list[str], backward: bool = True,
               t: int = 256, grid: int = 32) -> None:  # fmt: skip
    """block_sparse_attention on contiguous (B, nh, N, hd) inputs (the kernel tests, the benchmark)."""
    from kernels.block_sparse_attention import block_sparse_attention
    from megadalle.models.sparsity import MaskSpec

    for kind in kinds:
        q, k, v = (_meta(shape, dtype).requires_grad_() for _ in range(3))
        out = block_sparse_attention(q, k, v, MaskSpec(kind, t, grid, grid))
        if backward:
            out.backward(_meta(shape, dtype))


def _model_attention(args: Any, dtype: torch.dtype, kinds: list[str] | None = None) -> None:
    """The prior's attention resblock of each kind in the flavor's schedule, forward and backward, stored in
    `dtype` (fp16 blocks, or autocast: the same q, k, v views of the qkv projection)."""
    from megadalle.models.sparsity import layer_kinds
    from megadalle.models.transformer import AttentionBlock

    for kind in dict.fromkeys(kinds or layer_kinds(args.n_layers)):
        with torch.device("meta"):
            block = AttentionBlock(args, kind, "triton").to(dtype)
        x = _meta((1, args.seq_len, args.d_model), dtype).requires_grad_()
        block.branch(x).float().sum().backward()


def _flavor(name: str) -> Any:
    from megadalle.models.transformer import FLAVORS

    return FLAVORS[name]


def _matrix_shards(args: Any, gpus_per_node: int = 8) -> list[tuple[int, int]]:
    """(rows, cols), rows <= cols, of one GPU's shards of a layer's resblock matrices (rows split over the node
    group, as engine/ds_powersgd.py shards them), from the prior's own layer."""
    from megadalle.models.transformer import Layer

    with torch.device("meta"):
        layer = Layer(args, "row", "triton")
    shapes = []
    for block in layer.resblocks():
        for p in block.parameters():
            if p.dim() == 2 and p.shape[0] % gpus_per_node == 0:
                a, b = p.shape[0] // gpus_per_node, p.shape[1]
                shapes.append((min(a, b), max(a, b)))
    return sorted(set(shapes))


def _powersgd(shapes: list[tuple[int, int]], rank: int, fmts: tuple[str, ...] = ("FMT_169", "FMT_0610")) -> None:
    """PowerSGD's per-shard kernels as engine/powersgd.py calls them (error feedback, decode, the 16-bit
    all-reduce's codec on P, Householder, decompress), in each format."""
    import kernels.powersgd as ps

    for rows, cols in shapes:
        r = min(rank, rows)
        if r * (rows + cols) >= rows * cols:
            continue  # the engine sends such a shard uncompressed
        for f in fmts:
            fmt = getattr(ps, f)
            e = _meta((rows, cols), torch.int16)
            ps.error_feedback_add_(e, _meta((rows, cols)), 2.0, fmt)
            ps.decode(e, fmt)
            ps.decode(ps.encode(_meta((rows * r,)), fmt), fmt)
            ps.decompress_update_(e, _meta((rows, r)), _meta((cols, r)), 2, fmt)
        ps.orthogonalize(_meta((rows, r)))


def _codec(sizes: tuple[int, ...] = (1, 4099, 4096)) -> None:
    """encode / decode / error feedback on flat sizes equal to 1, not divisible by 16 and divisible (ZeRO
    partitions of Adam's moments, the all-reduce's chunks), in both formats."""
    import kernels.powersgd as ps

    for f in ("FMT_169", "FMT_0610"):
        fmt = getattr(ps, f)
        for n in sizes:
            codes = ps.encode(_meta((n,)), fmt)
            ps.decode(codes, fmt)
            ps.error_feedback_add_(codes, _meta((n,)), 2.0, fmt)


def _gpu_tests() -> None:
    """tools/gpu_check.sh's first step: the gpu-marked tests it names."""
    from megadalle.models.transformer import PriorArgs

    kinds4 = ["row", "column", "conv", "causal"]
    for dtype in DTYPES.values():  # tests/kernels/test_block_sparse_attention.py: full size, head dims
        _attention((2, 16, 1280, 64), dtype, kinds4)
        for hd in (32, 128):
            _attention((1, 4, 1280, hd), dtype, ["row"])
    # tests/models/test_blocked_attention.py: the 4-layer fp32 prior, 4 heads of 64
    _model_attention(PriorArgs(n_layers=4, d_model=256, n_heads=4, text_len=256, text_vocab=1000, grid=32,
                               image_vocab=512), torch.float32)  # fmt: skip
    # tests/engine/test_grad_scaler.py: the tiny prior's fp16 blocks, `auto` attention (Triton on CUDA)
    _model_attention(PriorArgs(n_layers=2, d_model=32, n_heads=2, text_len=4, text_vocab=40, grid=3, image_vocab=16,
                               conv_kernel=3), torch.float16)  # fmt: skip
    # tests/kernels/test_powersgd.py (12B shard, rank 112) and tests/engine/test_powersgd.py (d 256 over 8, rank 16)
    _powersgd([(1984, 3968)], 112)
    _powersgd([(32, 256), (128, 256)], 16, ("FMT_169",))


def _bench_attention() -> None:
    """tools/bench_attention.py's defaults: heads 16 and 62, fp16 and bf16, batch 8, forward and backward."""
    for h in (16, 62):
        for dtype in (torch.float16, torch.bfloat16):
            _attention((8, h, 1280, 64), dtype, ["row", "column", "conv"])


SCENARIOS: dict[str, Callable[[], None]] = {
    **{f"train/{fl}/{dt}": (lambda fl=fl, dt=dt: _model_attention(_flavor(fl), DTYPES[dt]))
       for fl in ("12b", "1p3b") for dt in DTYPES},
    **{f"train/powersgd/{fl}/r{r}": (lambda fl=fl, r=r: _powersgd(_matrix_shards(_flavor(fl)), r))
       for fl in ("12b", "1p3b") for r in (16, 112, 896)},
    "train/codec": _codec,
    "gpu_check/tests": _gpu_tests,
    "gpu_check/bench_attention": _bench_attention,
    "gpu_check/bench_powersgd_kernels": lambda: _powersgd([(1984, 3968)], 112, ("FMT_169",)),
    "gpu_check/bench_train_gpu": lambda: _model_attention(_flavor("1p3b"), torch.bfloat16),
}  # fmt: skip
"""Scenario name -> a function making its launches (ranks are per GPU: the paper's 896 over 8 GPUs is 112)."""


def select(patterns: list[str] | None) -> list[str]:
    """Scenario names matching any of the fnmatch `patterns` (all when None)."""
    if not patterns:
        return list(SCENARIOS)
    names = [n for n in SCENARIOS if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    if not names:
        raise ValueError(f"no scenario matches {patterns}; known: {', '.join(SCENARIOS)}")
    return names


def variant(module: str, name: str, options: Any, signature: dict, constexprs: dict, attrs: dict) -> Variant:
    """A hashable, picklable Variant of what `specialise` returns."""
    return Variant(module, name, tuple(signature.items()), tuple(sorted(constexprs.items())),
                   tuple(sorted((k, tuple(map(tuple, a))) for k, a in attrs.items())),
                   tuple(sorted(options.__dict__.items())))  # fmt: skip


def record(name: str) -> list[tuple]:
    """The launches of scenario `name`: (kernel, module, kernel name, args, kwargs) each."""
    with _recording() as calls:
        SCENARIOS[name]()
    return calls


def collect(names: list[str]) -> list[Variant]:
    """The distinct variants the scenarios `names` launch, in first-launch order, each with its scenarios."""
    from triton.compiler.compiler import make_backend

    backend = make_backend(target())
    found: dict[tuple, Variant] = {}
    users: dict[tuple, list[str]] = {}
    for name in names:
        for kernel, module, kname, args, kwargs in record(name):
            v = variant(module, kname, *specialise(backend, kernel, args, kwargs))
            found.setdefault(v.key, v)
            if name not in users.setdefault(v.key, []):
                users[v.key].append(name)
    return [Variant(*v.key, scenarios=tuple(users[k])) for k, v in found.items()]


# --- compiling ----------------------------------------------------------------------------------------------------


@dataclass
class Result:
    variant: Variant
    seconds: float = 0.0
    shared: int | None = None
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.shared is not None and self.shared <= HOPPER_SMEM


_PTXAS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads\s*\n.*?Used (\d+) registers", re.S)


def _ptxas_log(ptx: str, arch: str) -> str:
    """ptxas -v on `ptx` (as Triton's backend runs it): for a kernel that came from the cache."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [get_ptxas(SM).path, "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}", src, "-o",
               os.path.join(d, "k.o")]  # fmt: skip
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stderr


def _init_worker(cache_dir: str | None) -> None:
    os.environ.pop("TRITON_INTERPRET", None)
    from triton import knobs

    if cache_dir is not None:
        knobs.cache.dir = cache_dir
    knobs.nvidia.dump_ptxas_log = True  # Triton runs ptxas -v; its log is printed, and captured below


def _compile_one(v: Variant) -> Result:
    src = v.source()
    out = io.StringIO()
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(out):
            compiled = triton.compile(src, target=target(), options=dict(v.options))
    except Exception as e:  # reported per variant; the tool fails at the end
        return Result(v, time.perf_counter() - t0, error=f"{type(e).__name__}: {str(e).strip()[:2000]}")
    seconds = time.perf_counter() - t0
    log = out.getvalue() or _ptxas_log(compiled.asm["ptx"], f"sm_{SM}a")  # empty: a cache hit
    m = _PTXAS.search(log)
    if m is None:
        return Result(v, seconds, compiled.metadata.shared, error=f"no register count in the ptxas log: {log[:500]}")
    stores, loads, regs = (int(x) for x in m.groups())
    return Result(v, seconds, int(compiled.metadata.shared), regs, stores, loads)


def compile_all(variants: list[Variant], jobs: int = 2, cache_dir: str | None = "") -> list[Result]:
    """Compile `variants` for sm_90 in `jobs` processes. cache_dir: "" a fresh temporary Triton cache (every
    variant compiled: the timing is a cold one), None Triton's own cache (warms it for later launches on this
    machine), else that folder."""
    with contextlib.ExitStack() as stack:
        if cache_dir == "":
            cache_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="compile_kernels_"))
        if jobs <= 1:
            _init_worker(cache_dir)
            return [_compile_one(v) for v in variants]
        # the slowest first: the attention backward kernels take the longest (a better packing of the pool)
        order = sorted(range(len(variants)), key=lambda i: (variants[i].name != "_bwd_dkdv_kernel",
                                                            "fp32" not in variants[i].config()))  # fmt: skip
        with ProcessPoolExecutor(jobs, mp_context=get_context("spawn"), initializer=_init_worker,
                                 initargs=(cache_dir,)) as pool:  # fmt: skip
            done = dict(zip(order, pool.map(_compile_one, [variants[i] for i in order])))
        return [done[i] for i in range(len(variants))]


# --- reporting ----------------------------------------------------------------------------------------------------


def table(results: list[Result]) -> str:
    """One line per variant: kernel, config, warps/stages, shared memory, registers, spills, seconds, verdict."""
    head = (f"{'kernel':<28} {'config':<62} {'w/s':>5} {'shared B':>9} {'regs':>5} {'spill st/ld':>12} {'s':>6}  "
            "status")  # fmt: skip
    lines = [head, "-" * len(head)]
    for r in results:
        v = r.variant
        status = "ok" if r.ok else (r.error.splitlines()[0][:80] if r.error else f"shared > {HOPPER_SMEM}")
        spills = "-" if r.spill_stores is None else f"{r.spill_stores}/{r.spill_loads}"
        lines.append(f"{v.name:<28} {v.config()[:62]:<62} {v.num_warps:>2}/{v.num_stages:<2} "
                     f"{'-' if r.shared is None else r.shared:>9} {'-' if r.registers is None else r.registers:>5} "
                     f"{spills:>12} {r.seconds:>6.1f}  {status}")  # fmt: skip
    return "\n".join(lines)


def per_scenario(results: list[Result]) -> dict[str, dict[str, float]]:
    """Scenario -> variants it launches and their summed compile seconds (one process, cold cache)."""
    out: dict[str, dict[str, float]] = {}
    for r in results:
        for s in r.variant.scenarios:
            d = out.setdefault(s, {"variants": 0, "compile_s": 0.0})
            d["variants"] += 1
            d["compile_s"] += r.seconds
    return out


def summary(results: list[Result]) -> dict[str, Any]:
    ok = [r for r in results if r.shared is not None]
    return {
        "variants": len(results),
        "failed": sum(not r.ok for r in results),
        "max_shared": max((r.shared for r in ok), default=0),
        "max_registers": max((r.registers or 0 for r in ok), default=0),
        "spilling": sorted({f"{r.variant.name} {r.variant.config()}" for r in ok if (r.spill_stores or 0) > 0}),
        "compile_s": round(sum(r.seconds for r in results), 1),
    }


# --- preflight on a GPU machine -----------------------------------------------------------------------------------


@triton.jit
def _add_one(X, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(X + offs, tl.load(X + offs, mask=offs < N) + 1, mask=offs < N)


def preflight() -> float:
    """Compile and run one trivial kernel on the current CUDA device: Triton builds its launcher with the C
    compiler against the Python headers on first use, so a machine without them fails here, in seconds, with
    that said, rather than in every test. Returns the seconds it took."""
    t0 = time.perf_counter()
    if not torch.cuda.is_available():
        raise RuntimeError("torch sees no CUDA device")
    x = torch.zeros(1000, device="cuda")
    try:
        _add_one[(triton.cdiv(1000, 256),)](x, 1000, BLOCK=256)
        torch.cuda.synchronize()
    except Exception as e:
        raise RuntimeError(f"Triton could not compile or launch a trivial kernel ({type(e).__name__}: {e}); it needs "
                           "a C compiler (gcc or cc) and the Python headers (python3-dev) to build its launcher, and "
                           "ptxas from the triton wheel") from e  # fmt: skip
    if not bool((x == 1).all()):
        raise RuntimeError("a trivial Triton kernel ran but computed a wrong result")
    return time.perf_counter() - t0
