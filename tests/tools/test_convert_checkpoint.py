"""tools/convert_checkpoint.py: a 2-rank ZeRO-3 prior checkpoint -> safetensors -> a fresh single-process model
with the same logits; 2 ranks -> 3 -> 2 with the next update's loss unchanged; OpenAI's dVAE (the `dall-e`
package's classes, random weights, pickled as the release is) imported with identical outputs; every error."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, python, require, torchrun

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([python(), "tools/convert_checkpoint.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600)  # fmt: skip


def prior_args(root: Path, tokens: Path, tokenizer: Path, *extra: str) -> list[str]:
    return ["--config", "megadalle/configs/prior_debug.toml", f"--prior.tokens={tokens}",
            f"--tokenizer.model_path={tokenizer}", f"--job.run_root={root}", "--deepspeed_config",
            "ds_configs/zero3_cpu.json", "--train.eval_every=0", *extra]  # fmt: skip


def _prior_run(root: Path, tokens: Path, tokenizer: Path, *extra: str) -> Path:
    proc = torchrun(REPO / "megadalle" / "train.py", 2, prior_args(root, tokens, tokenizer, "--train.steps=4", *extra))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root / "prior_debug"


@pytest.fixture(scope="module")
def prior_run(token_shards, tokenizer_model, tmp_path_factory) -> Path:
    """The debug prior trained 4 updates on 2 ZeRO-3 ranks (EMA kept), its checkpoint at step 4."""
    return _prior_run(tmp_path_factory.mktemp("zero3"), token_shards, tokenizer_model)


def test_export_to_safetensors_loads_without_deepspeed_with_the_same_logits(prior_run, tmp_path) -> None:
    ckpt = prior_run / "checkpoints" / "step_00000004"
    for weights, dtype in (("ema", "fp32"), ("live", "fp32"), ("live", "bf16")):
        out = tmp_path / f"{weights}_{dtype}.safetensors"
        proc = tool("export", str(ckpt), "--out", str(out), "--weights", weights, "--dtype", dtype, "--verify")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "verify export: OK" in proc.stdout and out.is_file()
        meta = json.loads(out.with_suffix(".json").read_text())
        assert meta["stage"] == "prior" and meta["step"] == "4" and meta["model_args"]["d_model"] == 64
    # exact in fp32: the logits of the exported live weights, loaded in a fresh process with no DeepSpeed and no
    # process group, equal those of the weights gathered from the 2 ZeRO-3 shards
    exact = tool("export", str(ckpt), "--out", str(tmp_path / "x.safetensors"), "--weights", "live", "--verify")
    assert "verify export: OK (max 0, tolerance 0)" in exact.stdout and not exact.stderr, exact.stdout + exact.stderr
    assert "WARNING" not in exact.stdout  # a clean console
    check = (
        "import sys, torch; from megadalle.stages.load import load_trained\n"
        f"m, cfg = load_trained({str(tmp_path / 'ema_fp32.safetensors')!r}, 'prior')\n"
        "import torch.distributed as d; assert not d.is_initialized()\n"
        "print('OK', cfg.job.stage, sum(p.numel() for p in m.parameters()), 'deepspeed' in sys.modules)"
    )
    proc = subprocess.run([python(), "-c", check], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.startswith("OK prior"), proc.stdout + proc.stderr


def test_reshard_2_to_3_to_2_resumes_with_the_same_next_update(token_shards, tokenizer_model, tmp_path):
    """Without an EMA (the weights for sampling are then the live fp32 masters of DeepSpeed's shards) and through 3
    ranks, which split the 64-wide debug prior unevenly (ZeRO-3 pads the last share)."""
    ckpt = _prior_run(tmp_path / "run", token_shards, tokenizer_model, "--optim.ema_decay=0") / "checkpoints"
    ckpt = ckpt / "step_00000004"
    three = tmp_path / "three" / "step_00000004"
    for src, dst, world in ((ckpt, three.parent, 3), (three, tmp_path / "two", 2)):
        proc = tool("reshard", str(src), "--out", str(dst), "--world", str(world), "--verify")
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "max |difference| weights 0, exp_avg 0, exp_avg_sq 0;" in proc.stdout
        assert "verify reshard: OK" in proc.stdout
    assert (tmp_path / "two" / "step_00000004" / "from_world_2" / "rank00001.pt").is_file()
    losses = {}
    for name, resume in (("original", ckpt), ("round_trip", tmp_path / "two" / "step_00000004")):
        root = tmp_path / name
        args = prior_args(root, token_shards, tokenizer_model, "--train.steps=5", f"--checkpoint.resume={resume}",
                          "--optim.ema_decay=0")  # fmt: skip
        proc = torchrun(REPO / "megadalle" / "train.py", 2, args)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        lines = [json.loads(x) for x in (root / "prior_debug" / "metrics.jsonl").read_text().splitlines()]
        losses[name] = [m["loss"] for m in lines if m["kind"] == "train"]
    assert len(losses["original"]) == 1 and losses["original"] == losses["round_trip"]  # update 5, bit for bit
    proc = tool("reshard", str(ckpt), "--out", str(ckpt.parent), "--world", "1")
    assert proc.returncode == 2 and "is the source's own checkpoints folder" in proc.stderr


def test_reshard_writes_the_ema_as_shards_of_the_new_world(prior_run, tmp_path) -> None:
    """2 -> 3 ranks: three EMA shard files, which read back whole to the same EMA bit for bit."""
    from megadalle.engine.checkpoint import open_eval_weights

    ckpt = prior_run / "checkpoints" / "step_00000004"
    proc = tool("reshard", str(ckpt), "--out", str(tmp_path / "three"), "--world", "3", "--verify")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "exp_avg_sq 0, EMA 0;" in proc.stdout
    target = tmp_path / "three" / "step_00000004"
    assert sorted(p.name for p in target.glob("ema_shard*")) == [f"ema_shard{i:05d}.safetensors" for i in range(3)]
    assert sorted(p.name for p in ckpt.glob("ema_shard*")) == [f"ema_shard{i:05d}.safetensors" for i in range(2)]
    a, b = open_eval_weights(ckpt), open_eval_weights(target)
    assert a.kind == b.kind == "ema" and all(torch.equal(t, b.read(k)) for k, t in a.items())


def _openai_pair(tmp_path: Path, **sizes) -> tuple[Path, Path]:
    """OpenAI's Encoder and Decoder with random weights, pickled whole as the release's files are."""
    try:
        from dall_e.decoder import Decoder
        from dall_e.encoder import Encoder
    except ImportError as e:
        require(False, f"the `dall-e` package is not importable: {e}")
    torch.manual_seed(0)
    n_init = sizes.pop("n_init", 128)
    enc, dec = Encoder(**sizes), Decoder(n_init=n_init, **sizes)
    for module in (enc, dec):  # the released weights are not all at their initial values
        with torch.no_grad():
            for p in module.parameters():
                p.add_(0.01 * torch.randn_like(p))
    paths = tmp_path / "encoder.pkl", tmp_path / "decoder.pkl"
    torch.save(enc, paths[0])
    torch.save(dec, paths[1])
    return paths


def test_import_openai_dvae_gives_identical_outputs(tmp_path) -> None:
    enc, dec = _openai_pair(tmp_path)  # the release's sizes: 4 groups, 256 wide, 2 blocks, 8192 codes
    proc = tool("import-openai-dvae", str(enc), str(dec), "--out", str(tmp_path / "openai"), "--verify")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "paper flavor" in proc.stdout and "verify import-openai-dvae: OK" in proc.stdout
    from megadalle.stages.load import load_trained

    model, cfg = load_trained(tmp_path / "openai" / "checkpoints", "dvae")
    assert cfg.model.dvae_flavor == "paper" and model.args.vocab_size == 8192


def test_errors_name_what_and_where(prior_run, tmp_path) -> None:
    ckpt = prior_run / "checkpoints" / "step_00000004"
    broken = tmp_path / "broken" / "step_00000004"
    shutil.copytree(ckpt, broken)
    optim = sorted(broken.glob("*zero_pp_rank_1_*optim_states.pt"))
    optim[0].unlink()
    marker = json.loads((broken / "COMPLETE").read_text())  # still "complete" for the marker, to reach the reader
    marker["files"] = {k: v for k, v in marker["files"].items() if "zero_pp_rank_1_" not in k or "optim" not in k}
    (broken / "COMPLETE").write_text(json.dumps(marker))
    proc = tool("export", str(broken), "--out", str(tmp_path / "x.safetensors"), "--weights", "live")
    assert proc.returncode == 2 and "the optimizer shards of ranks [1] of 2 are missing" in proc.stderr, proc.stderr
    incomplete = tmp_path / "incomplete" / "step_00000004"
    shutil.copytree(ckpt, incomplete)
    (incomplete / "COMPLETE").unlink()
    proc = tool("export", str(incomplete), "--out", str(tmp_path / "x.safetensors"))
    assert proc.returncode == 2 and "is not a complete checkpoint" in proc.stderr
    other = tmp_path / "other" / "step_00000004"  # a config that does not build the saved model
    shutil.copytree(ckpt, other)
    extra = torch.load(other / "extra.pt", weights_only=True)
    extra["config"] = extra["config"].replace('prior_flavor = "debug"', 'prior_flavor = "small"')
    torch.save(extra, other / "extra.pt")
    marker = json.loads((other / "COMPLETE").read_text())
    marker["files"]["extra.pt"] = (other / "extra.pt").stat().st_size
    (other / "COMPLETE").write_text(json.dumps(marker))
    proc = tool("export", str(other), "--out", str(tmp_path / "x.safetensors"))
    assert proc.returncode == 2 and "does not match the model its config builds" in proc.stderr
    assert "48 missing keys [layers.4.attn.ln.bias" in proc.stderr, proc.stderr  # the small prior has 8 layers
    assert "shapes (weights != model) [col_emb.weight (8, 64) != (8, 256)" in proc.stderr, proc.stderr
    proc = tool("reshard", str(ckpt), "--out", str(tmp_path / "r"), "--world", "0")
    assert proc.returncode == 2 and "--world must be at least 1" in proc.stderr
    proc = tool("export", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.safetensors"))
    assert proc.returncode == 2 and "no checkpoint folder" in proc.stderr


def test_openai_import_errors(tmp_path) -> None:
    enc, dec = _openai_pair(tmp_path, n_hid=64, n_blk_per_group=1, vocab_size=512, n_init=32)
    proc = tool("import-openai-dvae", str(enc), str(dec), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "match no dVAE flavor" in proc.stderr and "'n_hid': 64" in proc.stderr
    proc = tool("import-openai-dvae", str(dec), str(enc), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "expected an Encoder then a Decoder" in proc.stderr
    evil = tmp_path / "evil.pkl"  # a pickle that would run a command: refused, never executed
    evil.write_bytes(pickle.dumps(_Exploit(tmp_path / "pwned")))
    proc = tool("import-openai-dvae", str(evil), str(dec), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "refused by the restricted unpickler" in proc.stderr
    assert not (tmp_path / "pwned").exists()


class _Exploit:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.target}",))
