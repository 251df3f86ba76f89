"""What a prior flavor costs on a cluster: memory per GPU, communication and time per update (tools/plan.py).

The model is megadalle's own ZeRO-3 training of the prior (engine/, App. D and E of the paper):
- **Model states per GPU**, ZeRO-3 sharded over the `shard` ranks of a node group (all ranks without PowerSGD).
  Parameters smaller than DeepSpeed's persistence threshold stay whole on every rank; their optimizer states and
  gradients are still sharded. Bytes per parameter, as measured in DeepSpeed 0.19.8's ZeRO-3 tensors
  (tests/engine/test_planner.py measures the fp32 and bf16 rows on 2 and 4 ranks; the per-resblock row follows
  engine/ds_grad_scaler.py's storage):

  | training | parameter | gradient | fp32 master | Adam moments |
  |---|---|---|---|---|
  | fp32 | 4 | 4 | 4 | 8 |
  | bf16, fp16 with DeepSpeed's loss scale (`grad_scaler = global`) | 2 | 2 | 4 | 8 |
  | fp16 with a scale per resblock (App. D; autocast) | 4 (is the master) | 4 | 0 | 8 |

  `optim.moments = paper16` halves the resblock matrices' moments (4 B; the rest keeps fp32). DeepSpeed's own
  estimator counts 18 B per parameter for its mixed precision where the tensors hold 16: it adds slack.
- **PowerSGD buffers**: the error buffer of each compressed matrix shard (1-6-9, 2 B per element), P and Q'
  (fp32) at rank r / gpus_per_node, and the decompressed update of every shard (fp32), held until copied back.
- **Activations**: with checkpointing, each resblock's input (B S d; 4 B where the residual stream is fp32:
  fp32 training and the per-resblock fp16 scheme) plus one layer recomputed at a time; without, S B d (34 + 5 a
  S_att / d) bytes per layer (Korthikanti et al. 2022, dropout terms included), S_att being the average number
  of keys a query attends to under the sparse masks.
- **Work buffers**: the parameters ZeRO-3 may keep gathered (`stage3_max_live_parameters`), one reduce bucket
  of gradients, and the fp32 logits with their log-softmax and gradient.
- **Time**: model FLOPs (`flops_per_sample`: 6 x matmul parameters per token plus attended pairs; x 4/3 with
  recomputation) at `efficiency` x peak; ZeRO-3's all-gathers (forward, backward, recomputation: an upper
  bound, DeepSpeed may keep a block's weights between the last two) and its
  reduce-scatter inside the shard group, half hidden behind compute; the gradient averaging across node groups
  (PowerSGD's P and Q' in 16 bits and the rest in fp32, or nothing when ZeRO-3 spans the nodes and its own
  collectives cross them), not hidden. MFU = model FLOPs (without recomputation) / (time x GPUs x peak).
- **Checkpoints and evaluation, within the shards** (engine/checkpoint.py, train.py's `_evaluate`): each rank of
  the first shard group (the others hold copies: under PowerSGD, node group 0 writes) writes DeepSpeed's file of its
  fp32 partitions and Adam moments (about its optimizer-state bytes, measured on 2 and 4 ranks in
  tests/engine/test_planner.py) and its EMA shard (4 B a parameter / shard group); extra.pt is small. They write at
  once: the time is one rank's bytes at `fs_gbps`, if the filesystem takes all of them at once
  (`checkpoint_total_bytes`). Extra peak memory, measured on CPU ranks at 1, 2 and 4 ranks in
  tests/engine/test_checkpoint_memory.py: a save, none there (the files are written from the tensors in place;
  from a GPU, torch.save copies each storage to the host whole, the largest being an optimizer sub-group's flat
  fp32 tensor: `save_extra_host_bytes`; `checkpoint.async_save` keeps a pinned host snapshot of the rank's files,
  `async_host_bytes`); a resume, in host memory, DeepSpeed's optimizer file of the rank, which its loader reads
  whole; an evaluation, on the GPU, the live parameter shard kept while the EMA is swapped in, plus ZeRO-3's
  gather window while the forward runs, 2 x (`stage3_max_live_parameters` + `stage3_prefetch_bucket_size`)
  elements (the gathered parameters and the all-gathers' output buffers; within 15% of the measurement). No rank
  holds the whole model.
- **Encoding stage 2's input** (tools/encode_shards.py): every image once through the dVAE encoder (272 GFLOP at
  256 px, counted by FlopCounterMode), at `efficiency` x the GPU's fp32 peak (TF32 where PyTorch's cuDNN uses it),
  the shards dealt to every GPU; decoding and reading the images are left out.
- **fp16 range**: the per-resblock scales start at 2^13 at any world size and accumulation count (each
  micro-batch's backward carries its own mean loss, engine/grad_scaler.py); what grows with the world is
  DeepSpeed's fp16 reduce-scatter, which divides each rank's gradients by its group (the shard group) before
  summing: log2(shard group) bits taken from fp16's subnormal end (3 at 8 GPUs a node group, 10 at 1,024 when
  ZeRO-3 spans every rank).
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, field

import torch

GiB = 2**30


@dataclass
class Cluster:
    nodes: int = 128
    gpus_per_node: int = 8
    gpu_memory_gib: float = 16.0
    peak_tflops: float = 125.0
    """Per GPU, in the training precision."""
    intra_gbps: float = 150.0
    """GB/s one GPU moves inside its node (NVLink, PCIe)."""
    inter_gbps: float = 12.5
    """GB/s one GPU moves across nodes (its share of the node's network: 8 x 100 Gb/s NICs give 12.5)."""
    fs_gbps: float = 1.0
    """GB/s one rank writes to the checkpoint filesystem."""
    fp32_tflops: float = 15.7
    """Per GPU, for fp32 convolutions (the dVAE encoder of tools/encode_shards.py): TF32 tensor cores where the GPU
    has them and PyTorch uses them (its default for cuDNN: 494 on an H100 / H200), plain fp32 on a V100 (15.7)."""

    def check(self) -> None:
        for name in ("nodes", "gpus_per_node"):
            if getattr(self, name) < 1:
                raise ValueError(f"cluster: {name} must be at least 1, got {getattr(self, name)}")
        for name in ("gpu_memory_gib", "peak_tflops", "intra_gbps", "inter_gbps", "fs_gbps", "fp32_tflops"):
            if not getattr(self, name) > 0:
                raise ValueError(f"cluster: {name} must be positive, got {getattr(self, name)}")


@dataclass
class Setting:
    flavor: str = "12b"
    micro_batch: int = 1
    global_batch: int = 1024
    checkpointing: bool = True
    precision: str = "fp16"
    grad_scaler: str = "per_resblock"
    moments: str = "fp32"
    powersgd_rank: int = 896
    """0: plain all-reduce across nodes."""
    efficiency: float = 0.5
    """The share of peak FLOP/s the matmuls reach."""
    persistence_threshold: int = 1_000_000
    """DeepSpeed's stage3_param_persistence_threshold: parameters of at most this many elements are not sharded."""
    max_live_parameters: int = 1_000_000_000
    """DeepSpeed's stage3_max_live_parameters (ds_configs/zero3_12b.json): the most gathered at once."""
    prefetch_bucket: int = 500_000_000
    """DeepSpeed's stage3_prefetch_bucket_size: parameters gathered ahead of their module's turn."""
    sub_group_size: int = 1_000_000_000
    """DeepSpeed's sub_group_size (its default): the optimizer's flat fp32 tensors, each saved as one storage."""
    ema: bool = True
    """An EMA of the weights is kept (optim.ema_decay > 0): its shard is checkpointed and evaluated."""
    encode_images: int = 250_000_000
    """Images the stage-2 encoding pass reads (tools/encode_shards.py): the paper's 250M pairs."""
    reduce_bucket: int = 500_000_000
    """DeepSpeed's reduce_bucket_size: gradient elements bucketed before a reduce-scatter."""

    def check(self) -> None:
        from megadalle.models.transformer import FLAVORS

        if self.flavor not in FLAVORS:
            raise ValueError(f"unknown prior flavor {self.flavor!r} (known: {sorted(FLAVORS)})")
        if self.micro_batch < 1 or self.global_batch < 1:
            raise ValueError(f"micro_batch and global_batch must be at least 1, got {self.micro_batch}, "
                             f"{self.global_batch}")  # fmt: skip
        if self.precision not in ("fp16", "bf16", "fp32"):
            raise ValueError(f"precision must be fp16, bf16 or fp32, got {self.precision!r}")
        if self.grad_scaler not in ("per_resblock", "global"):
            raise ValueError(f"grad_scaler must be per_resblock or global, got {self.grad_scaler!r}")
        if self.moments not in ("fp32", "paper16"):
            raise ValueError(f"moments must be fp32 or paper16, got {self.moments!r}")
        if self.powersgd_rank < 0 or not 0 < self.efficiency <= 1:
            raise ValueError(f"powersgd_rank >= 0 and efficiency in (0, 1] needed, got {self.powersgd_rank}, "
                             f"{self.efficiency}")  # fmt: skip


@dataclass
class Shapes:
    """The prior's parameters, counted on the meta device (no memory): name -> shape."""

    params: dict[str, tuple[int, ...]] = field(default_factory=dict)
    matrices: list[tuple[int, int]] = field(default_factory=list)
    """Resblock matmul weights (out, in): what PowerSGD compresses."""

    @property
    def total(self) -> int:
        return sum(math.prod(s) for s in self.params.values())

    @property
    def largest(self) -> int:
        return max(math.prod(s) for s in self.params.values())


def prior_shapes(flavor: str) -> Shapes:
    from megadalle.models.transformer import FLAVORS, DallePrior

    with torch.device("meta"):
        model = DallePrior(FLAVORS[flavor], "dense")
    out = Shapes({k: tuple(p.shape) for k, p in model.named_parameters()})
    out.matrices = [s for k, s in out.params.items() if k.startswith("layers.") and len(s) == 2]
    return out


def plan(cluster: Cluster, s: Setting) -> dict:
    """Every estimate as a flat dict of numbers (bytes, seconds, rates) plus `fits`."""
    from megadalle.models.sparsity import attended_pairs, layer_kinds
    from megadalle.models.transformer import FLAVORS, flops_per_sample

    cluster.check()
    s.check()
    a = FLAVORS[s.flavor]
    shapes = prior_shapes(s.flavor)
    world = cluster.nodes * cluster.gpus_per_node
    if s.global_batch % (s.micro_batch * world):
        raise ValueError(f"global batch {s.global_batch} is not a multiple of micro-batch {s.micro_batch} x "
                         f"{world} GPUs")  # fmt: skip
    accum = s.global_batch // (s.micro_batch * world)
    powersgd = s.powersgd_rank > 0 and cluster.nodes > 1
    shard = cluster.gpus_per_node if powersgd else world  # ZeRO-3's data-parallel group
    sizes = [math.prod(x) for x in shapes.params.values()]
    sharded = sum(n for n in sizes if n > s.persistence_threshold)
    whole = sum(n for n in sizes if n <= s.persistence_threshold)  # DeepSpeed: ds_numel <= threshold stays whole
    held = sharded / shard + whole  # parameters this GPU holds whole or in part
    states = shapes.total / shard  # its share of gradients and optimizer states
    sixteen = s.precision in ("fp16", "bf16")
    if s.precision == "fp16" and s.grad_scaler == "per_resblock":
        param_b, grad_b, master_b = 4, 4, 0
    elif sixteen:
        param_b, grad_b, master_b = 2, 2, 4
    else:
        param_b, grad_b, master_b = 4, 4, 4
    matrix_params = sum(m * n for m, n in shapes.matrices)
    if s.moments == "paper16":  # AdamW16: 16-bit moments for the resblock matrices, fp32 for everything else
        moment_bytes = (matrix_params * 4 + (shapes.total - matrix_params) * 8) / shard
    else:
        moment_bytes = states * 8
    out: dict = {"flavor": s.flavor, "parameters": shapes.total, "world": world, "shard_group": shard,
                 "grad_accum": accum, "powersgd": powersgd}  # fmt: skip
    out["params_bytes"] = held * param_b
    out["grads_bytes"] = states * grad_b
    out["optimizer_bytes"] = states * master_b + moment_bytes
    out["model_states_bytes"] = out["params_bytes"] + out["grads_bytes"] + out["optimizer_bytes"]
    r = max(1, s.powersgd_rank // cluster.gpus_per_node) if powersgd else 0  # engine/ds_powersgd.py's per-GPU rank
    pq = sum((m / shard + n) * min(r, m // shard) for m, n in shapes.matrices) if powersgd else 0
    # the error buffers (1-6-9), P and Q' (fp32), and the decompressed update of every shard, fp32, held until
    # the averaging copies it back (engine/powersgd.py's peak)
    out["powersgd_bytes"] = (matrix_params / shard * (2 + 4) + pq * 4) if powersgd else 0
    seq, d, heads = a.seq_len, a.d_model, a.n_heads
    kinds = layer_kinds(a.n_layers)
    pairs = attended_pairs(kinds, a.text_len, a.grid, a.grid, a.conv_kernel)
    keys = sum(pairs) / len(pairs) / seq  # attended keys per query, on average
    b = s.micro_batch
    stream_b = 2 if s.precision == "bf16" or (s.grad_scaler == "global" and sixteen) else 4  # the residual stream
    full_layer = seq * b * d * (34 + 5 * heads * keys / d)  # bytes, 16-bit activations
    if s.checkpointing:  # each resblock's input (two a layer), and one layer's activations while it recomputes
        out["activation_bytes"] = 2 * a.n_layers * seq * b * d * stream_b + full_layer
    else:
        out["activation_bytes"] = a.n_layers * full_layer
    logits = b * (a.text_len * a.text_vocab + a.grid * a.grid * a.image_vocab) * 4 * 3  # fp32, log-softmax, grad
    gather_b = 2 if sixteen else 4
    live = min(s.max_live_parameters, sharded)  # what ZeRO-3 may keep gathered at once
    out["buffer_bytes"] = live * gather_b + min(s.reduce_bucket, sharded) * grad_b + logits
    out["ema_bytes"] = states * 4 if s.ema else 0  # engine/ema.py: fp32, on the shard's device
    total = sum(out[k] for k in ("params_bytes", "grads_bytes", "optimizer_bytes", "ema_bytes", "powersgd_bytes",
                                 "activation_bytes", "buffer_bytes"))  # fmt: skip
    out["total_bytes"] = total
    out["fits"] = total <= 0.9 * cluster.gpu_memory_gib * GiB
    flops = flops_per_sample(a, pairs) * (4 / 3 if s.checkpointing else 1)
    step_flops = flops * s.global_batch / world  # per GPU
    compute_s = step_flops / (cluster.peak_tflops * 1e12 * s.efficiency)
    gathers = 3 if s.checkpointing else 2
    intra = (gathers + 1) * accum * sharded * (shard - 1) / shard * (2 if sixteen else 4) if shard > 1 else 0
    compressed = matrix_params / shard  # this GPU's share of the compressed matrices
    if cluster.nodes > 1 and powersgd:  # P and Q' in 16 bits, the rest in one fp32 all-reduce
        inter = 2 * (cluster.nodes - 1) / cluster.nodes * (pq * 2 + (states - compressed) * 4)
    else:  # one node, or ZeRO-3 over all ranks: its own collectives cross the nodes (counted as intra)
        inter = 0.0
    link = cluster.intra_gbps if shard <= cluster.gpus_per_node else cluster.inter_gbps
    intra_s = intra / (link * 1e9)
    inter_s = inter / (cluster.inter_gbps * 1e9)
    step_s = compute_s + 0.5 * intra_s + inter_s
    out.update(model_flops_per_update=flops * s.global_batch * (3 / 4 if s.checkpointing else 1),
               compute_s=compute_s, intra_node_bytes=intra, intra_node_s=intra_s, inter_node_bytes=inter,
               inter_node_s=inter_s, step_s=step_s, tokens_per_s=s.global_batch * seq / step_s)  # fmt: skip
    out["mfu"] = out["model_flops_per_update"] / step_s / (world * cluster.peak_tflops * 1e12)
    # checkpoint and evaluation (engine/checkpoint.py, train.py's _evaluate): DeepSpeed's per-rank file holds the
    # fp32 partitions (the master, or under per-resblock fp16 the parameters, which are their own master) and
    # the moments, and node group 0 the summed PowerSGD error buffers (fp32, this GPU's compressed shards); the
    # ranks of the first shard group each their EMA shard, fp32
    deepspeed_file = states * 4 + moment_bytes
    out["checkpoint_ema_bytes"] = out["ema_bytes"]
    out["checkpoint_rank_bytes"] = deepspeed_file + out["checkpoint_ema_bytes"] + (matrix_params / shard * 4 if
                                                                                   powersgd else 0)  # fmt: skip
    out["checkpoint_write_s"] = out["checkpoint_rank_bytes"] / (cluster.fs_gbps * 1e9)
    out["checkpoint_total_bytes"] = shard * out["checkpoint_rank_bytes"]  # the first shard group writes them all
    # torch.save moves each GPU storage to the host whole: the largest is an optimizer sub-group's flat fp32 tensor
    # (measured on CPU ranks, where there is no copy: 0)
    out["save_extra_host_bytes"] = min(s.sub_group_size, states) * 4
    out["async_host_bytes"] = out["checkpoint_rank_bytes"]  # checkpoint.async_save's pinned snapshot, kept
    out["resume_extra_host_bytes"] = deepspeed_file
    window = 2 * min(s.max_live_parameters + s.prefetch_bucket, sharded) * gather_b
    out["eval_extra_bytes"] = (out["params_bytes"] if s.ema else 0) + window
    resident = total - out["activation_bytes"]  # what stays on the GPU between updates, the EMA included
    out["fits_eval"] = resident + out["eval_extra_bytes"] <= 0.9 * cluster.gpu_memory_gib * GiB
    if s.precision == "fp16":  # the scales do not grow with the world; the reduce's pre-division does
        out["grad_scale_log2_init"] = 13.0 if s.grad_scaler == "per_resblock" else None
        out["fp16_reduce_predivide"] = shard
    # stage 2's input: every image through the dVAE encoder once (tools/encode_shards.py), an estimate from the
    # encoder's FLOPs at `efficiency` x the fp32 (TF32) peak on every GPU (the shards are dealt to the ranks; no
    # communication); JPEG decoding and reading the shards are left out (tools/bench_decode.py: 185 images/s on 2
    # CPU cores, so a GPU needs about its node's share of cores for them)
    out["encode_flops_per_image"] = dvae_encoder_flops("paper", 256)
    encode_flops = s.encode_images * out["encode_flops_per_image"]
    out["encode_s"] = encode_flops / (world * cluster.fp32_tflops * 1e12 * s.efficiency)
    out["cluster"], out["setting"] = asdict(cluster), asdict(s)
    return out


@functools.lru_cache(maxsize=4)
def dvae_encoder_flops(flavor: str, image_size: int) -> float:
    """FLOPs of one image through the dVAE encoder, counted by torch's FlopCounterMode on a meta-device model (272e9
    for the paper's at 256 px: its convolutions, 2 FLOPs a multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    from megadalle.config import JobConfig
    from megadalle.models.dvae import DiscreteVAE
    from megadalle.stages.dvae import dvae_args

    cfg = JobConfig()
    cfg.model.dvae_flavor, cfg.data.image_size = flavor, image_size
    with torch.device("meta"):
        model = DiscreteVAE(dvae_args(cfg))
        with FlopCounterMode(display=False) as counter:
            model.encoder(torch.zeros(1, 3, image_size, image_size))
    return float(counter.get_total_flops())


PRESETS: dict[str, tuple[Cluster, Setting]] = {
    # the paper: 1,024 V100 16 GB on 128 machines (Sec. 2.4-2.5), 16-bit Adam moments; 8 x V100 NVLink; the
    # network is our assumption (the paper gives none): 100 Gb/s a machine, shared by its 8 GPUs
    "paper": (Cluster(128, 8, 16.0, 125.0, 150.0, 100 / 8 / 8), Setting(moments="paper16")),
    # an H200 cluster: 141 GB, 989 TFLOP/s dense fp16/bf16, NVLink 4 (450 GB/s), 8 x 400 Gb/s per node; the memory
    # allows 8 samples a GPU, so ZeRO-3 gathers the weights once per update
    "h200": (
        Cluster(16, 8, 141.0, 989.0, 450.0, 50.0, fp32_tflops=494.0),
        Setting(micro_batch=8, precision="bf16", powersgd_rank=0),
    ),
}
