"""megadalle/engine/planner.py and tools/plan.py: parameter counts and model-state bytes against DeepSpeed's
estimator (3 flavors x 3 cluster shapes) and against the tensors DeepSpeed's ZeRO-3 holds on 2 and 4 real ranks
(fp32 and bf16), bad cluster descriptions, the command line."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from megadalle.engine.planner import Cluster, Setting, plan, prior_shapes
from tests.conftest import REPO, python, torchrun


@pytest.mark.parametrize("flavor", ["small", "1p3b", "12b"])
@pytest.mark.parametrize("nodes, per_node", [(1, 8), (16, 8), (128, 8)])
def test_model_states_against_deepspeeds_estimator(flavor, nodes, per_node) -> None:
    """DeepSpeed's estimate for its mixed precision with every parameter sharded is 18 B per parameter plus 4 B
    per parameter of the largest layer; the tensors hold 16 B (measured below): the planner must be 16/18 of it."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    shapes = prior_shapes(flavor)
    world = nodes * per_node
    _, gpu, largest = estimate_zero3_model_states_mem_needs(shapes.total, shapes.largest, per_node, nodes,
                                                            cpu_offload=False, cpu_offload_params=False)  # fmt: skip
    setting = Setting(flavor=flavor, global_batch=world, precision="bf16", grad_scaler="global", powersgd_rank=0,
                      persistence_threshold=0)  # fmt: skip
    ours = plan(Cluster(nodes, per_node, 80.0, 312.0, 300.0, 25.0), setting)["model_states_bytes"]
    assert ours == pytest.approx((gpu - largest) * 16 / 18, rel=1e-3)


def test_against_deepspeeds_live_estimate_of_the_real_model(capsys) -> None:
    """`estimate_zero3_model_states_mem_needs_all_live` on the real `small` prior (the larger flavors cannot be
    built here, and on the meta device every parameter shares data_ptr 0, which its de-duplication counts once):
    its parameter count, and its printed GB per GPU against the planner's (to the 0.01 GB it prints)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_live, model_to_params

    from megadalle.models.transformer import FLAVORS, DallePrior

    model = DallePrior(FLAVORS["small"], "dense")
    total, largest = model_to_params(model)
    assert prior_shapes("small").total == total
    estimate_zero3_model_states_mem_needs_all_live(model, num_gpus_per_node=1, num_nodes=1)
    row = next(x for x in capsys.readouterr().out.splitlines() if "offload_param=none, offload_optimizer=none, "
               "zero_init=1" in x)  # fmt: skip
    printed_gb = float(row.split("|")[1].strip().rstrip("GB"))
    setting = Setting(flavor="small", global_batch=1, precision="bf16", grad_scaler="global", powersgd_rank=0,
                      persistence_threshold=0)  # fmt: skip
    ours = plan(Cluster(1, 1, 80.0, 312.0, 300.0, 25.0), setting)["model_states_bytes"] * 18 / 16 + 4 * largest
    assert abs(ours / 2**30 - printed_gb) <= 0.006


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_model_states_against_deepspeed_on_real_ranks(world, precision, token_shards, tokenizer_model, tmp_path):
    """The debug prior under ZeRO-3 on `world` gloo ranks, one update: every rank's parameter partitions (and
    persistent parameters), fp32 masters, Adam moments and gradient partitions, against the planner's bytes for
    the same setting (persistence threshold 1,000: the matrices are sharded, the vectors stay whole)."""
    ds = json.loads((REPO / "ds_configs" / "zero3_cpu.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 1000
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    args = [str(tmp_path), "--config", "megadalle/configs/prior_debug.toml", f"--prior.tokens={token_shards}",
            f"--tokenizer.model_path={tokenizer_model}", f"--job.run_root={tmp_path}",
            f"--parallel.deepspeed_config={tmp_path / 'ds.json'}", f"--train.precision={precision}",
            "--train.micro_batch_size=2"]  # fmt: skip
    proc = torchrun(REPO / "tests" / "engine" / "memory_worker.py", world, args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    measured = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    setting = Setting(flavor="debug", micro_batch=2, global_batch=2 * world, precision=precision, powersgd_rank=0,
                      persistence_threshold=1000)  # fmt: skip
    p = plan(Cluster(1, world, 80.0, 312.0, 300.0, 25.0), setting)
    for m in measured:  # ZeRO-3 pads each parameter's last share: a few hundred elements per rank at most
        assert m["params"] == pytest.approx(p["params_bytes"], rel=0.02), (m, p["params_bytes"])
        assert m["grads"] == pytest.approx(p["grads_bytes"], rel=0.02), (m, p["grads_bytes"])
        assert m["master"] + m["moments"] == pytest.approx(p["optimizer_bytes"], rel=0.02), (m, p["optimizer_bytes"])
        # the checkpoint: DeepSpeed's files of this rank (fp32 partitions and moments; persistent parameters whole,
        # pickling) and its EMA shard; rank 0's extra.pt only the loop's small state
        assert m["checkpoint_rank"] == pytest.approx(p["checkpoint_rank_bytes"], rel=0.05), (
            m,
            p["checkpoint_rank_bytes"],
        )
    assert measured[0]["checkpoint_extra"] < 64 * 1024


def test_bad_descriptions_are_clear_errors() -> None:
    for cluster, setting, message in (
        (Cluster(nodes=0), Setting(), "nodes must be at least 1"),
        (Cluster(gpu_memory_gib=-1), Setting(), "gpu_memory_gib must be positive"),
        (Cluster(), Setting(flavor="huge"), "unknown prior flavor 'huge'"),
        (Cluster(nodes=3), Setting(global_batch=1000), "global batch 1000 is not a multiple of micro-batch 1 x 24"),
        (Cluster(), Setting(precision="fp8"), "precision must be fp16, bf16 or fp32"),
    ):
        with pytest.raises(ValueError, match=message):
            plan(cluster, setting)


def test_the_command_line_prints_the_paper_and_an_h200_cluster(tmp_path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([python(), "tools/plan.py", *args], cwd=REPO, capture_output=True, text=True, timeout=300)

    out = run()
    assert out.returncode == 0, out.stderr
    assert "paper" in out.stdout and "h200" in out.stdout and "1024 (128 x 8)" in out.stdout and "MFU" in out.stdout
    data = json.loads(run("--preset", "paper", "--nodes", "64", "--json").stdout)
    assert data["paper"]["world"] == 512 and data["paper"]["grad_accum"] == 2
    bad = run("--nodes", "0")
    assert bad.returncode == 2 and "nodes must be at least 1" in bad.stderr
    assert not Path(tmp_path / "x").exists()


def test_the_paper_preset_is_the_12b_run_file() -> None:
    """The planner's `paper` preset describes megadalle/configs/prior_12b.toml as slurm/train_12b.sh launches it
    (which adds PowerSGD between nodes): flavor, batch, checkpointing, precision, grad scaler, Adam's moments,
    PowerSGD's rank, GPUs a node and the ZeRO-3 sizes of its DeepSpeed JSON."""
    from megadalle.config import load_config
    from megadalle.engine.ds_config import grad_scaler_mode, load_ds_config
    from megadalle.engine.planner import PRESETS

    cluster, s = PRESETS["paper"]
    cfg = load_config(["--config", str(REPO / "megadalle/configs/prior_12b.toml")])
    ds = load_ds_config(cfg, world_size=cluster.nodes * cluster.gpus_per_node)
    z = ds["zero_optimization"]
    assert s.flavor == cfg.model.prior_flavor
    assert (s.micro_batch, s.global_batch) == (cfg.train.micro_batch_size, cfg.train.global_batch_size)
    assert s.checkpointing == cfg.train.activation_checkpointing
    assert (s.precision, s.grad_scaler) == (cfg.train.precision, grad_scaler_mode(cfg, ds))
    assert s.moments == cfg.optim.moments == "paper16"  # App. D/E's 16-bit moments
    assert s.powersgd_rank == cfg.powersgd.rank and cluster.gpus_per_node == cfg.parallel.gpus_per_node
    assert "--powersgd.enabled=true" in (REPO / "slurm/train_12b.sh").read_text()
    assert (s.persistence_threshold, s.max_live_parameters, s.reduce_bucket) == (
        z["stage3_param_persistence_threshold"],
        z["stage3_max_live_parameters"],
        z["reduce_bucket_size"],
    )


def test_fp16_scales_do_not_grow_with_the_world_but_the_reduce_predivision_does() -> None:
    """STYLE rule 19 for issue 26's item 1: the per-resblock scales start at 2^13 at 8 and 1,024 GPUs; DeepSpeed's
    fp16 reduce-scatter divides by the shard group (8 with PowerSGD between node groups, 1,024 without)."""
    from dataclasses import replace

    from megadalle.engine.planner import PRESETS, plan

    cluster, s = PRESETS["paper"]
    with_psgd, without = plan(cluster, s), plan(cluster, replace(s, powersgd_rank=0))
    assert with_psgd["grad_scale_log2_init"] == without["grad_scale_log2_init"] == 13
    assert (with_psgd["fp16_reduce_predivide"], without["fp16_reduce_predivide"]) == (8, 1024)
    assert "fp16_reduce_predivide" not in plan(*PRESETS["h200"])  # bf16


def test_checkpoint_and_evaluation_within_the_shards_at_12b_and_1024_ranks() -> None:
    """Issue 27: every rank writes its DeepSpeed file and its EMA shard (no rank gathers the model, extra.pt is
    small); the extra peaks are a shard's, not the model's (measured at 1, 2 and 4 ranks in
    test_checkpoint_memory.py), at the paper's 1,024 ranks as at 8."""
    from megadalle.engine.planner import PRESETS, plan

    for name in ("paper", "h200"):
        cluster, s = PRESETS[name]
        p = plan(cluster, s)
        share = p["parameters"] / p["shard_group"]  # a rank's share of the parameters
        assert p["checkpoint_ema_bytes"] == pytest.approx(4 * share, rel=1e-6)
        assert p["checkpoint_rank_bytes"] <= 20 * share and p["resume_extra_host_bytes"] <= 16 * share
        window = 2 * (s.max_live_parameters + s.prefetch_bucket) * 2  # 16-bit gathered parameters and buffers
        assert p["params_bytes"] <= 4.1 * share  # the live shard kept while the EMA is in (persistent ones whole)
        assert p["eval_extra_bytes"] == pytest.approx(p["params_bytes"] + window)
        assert p["save_extra_host_bytes"] <= 4 * min(s.sub_group_size, share) and p["async_host_bytes"] <= 20 * share
        assert p["checkpoint_total_bytes"] == p["shard_group"] * p["checkpoint_rank_bytes"]  # node group 0 writes
        assert p["checkpoint_write_s"] == pytest.approx(p["checkpoint_rank_bytes"] / (cluster.fs_gbps * 1e9))
        assert "gather_peak_bytes" not in p and "checkpoint_extra_bytes" not in p
    wide = plan(Cluster(128, 8), Setting(powersgd_rank=0))  # ZeRO-3 over all 1,024 ranks: a 1/1,024 shard
    assert wide["shard_group"] == 1024 and wide["checkpoint_ema_bytes"] == pytest.approx(4 * wide["parameters"] / 1024)


def test_dvae_encode_estimate_counts_the_encoders_convolutions():
    """The encode estimate's FLOPs equal 2 x the multiply-adds of every convolution the encoder runs (counted by
    forward hooks on a real model), and its time falls with the GPUs."""
    from megadalle.config import JobConfig
    from megadalle.engine.planner import dvae_encoder_flops
    from megadalle.models.dvae import Conv2d, DiscreteVAE
    from megadalle.stages.dvae import dvae_args

    cfg = JobConfig()
    cfg.model.dvae_flavor, cfg.data.image_size = "debug", 32
    model = DiscreteVAE(dvae_args(cfg))
    macs = []

    def hook(conv, _inputs, out):
        macs.append(out.numel() * conv.n_in * conv.kw**2)

    for m in model.encoder.modules():
        if isinstance(m, Conv2d):
            m.register_forward_hook(hook)
    with torch.no_grad():
        model.encoder(torch.zeros(1, 3, 32, 32))
    assert macs and dvae_encoder_flops("debug", 32) == 2 * sum(macs)
    paper = dvae_encoder_flops("paper", 256)
    assert 2.5e11 < paper < 3e11
    one, many = plan(Cluster(nodes=1), Setting()), plan(Cluster(nodes=4), Setting())
    assert one["encode_s"] == pytest.approx(4 * many["encode_s"])
    assert one["encode_s"] == pytest.approx(250e6 * paper / (8 * 15.7e12 * 0.5))  # a V100's fp32 peak
