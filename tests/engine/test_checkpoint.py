import json
import logging

import pytest
import torch

from megadalle.config import Checkpoint, ConfigError
from megadalle.engine.checkpoint import (
    EXTRA,
    MARKER,
    CheckpointError,
    find_resume,
    load_checkpoint,
    load_eval_weights,
    prepare_resume,
    save_atomic,
    write_marker,
)
from megadalle.engine.ema import ShardedEMA

STATES = "mp_rank_00_model_states.pt"


def fake_checkpoint(root, step, complete=True):
    """A step folder as save_checkpoint leaves it: extra.pt, a DeepSpeed-like states file, the marker last."""
    folder = root / f"step_{step:08d}"
    folder.mkdir(parents=True)
    weights = {"w": torch.full((3,), float(step))}
    save_atomic({"step": step, "weights": weights, "weights_kind": "live", "config": "[job]\n"}, folder / EXTRA)
    (folder / STATES).write_bytes(b"0123456789")
    if complete:
        write_marker(folder, step, world_size=1)
    return folder


def test_find_resume_auto_skips_incomplete_and_corrupt_with_warnings(tmp_path, caplog):
    assert find_resume(tmp_path / "nothing", "auto") is None  # a fresh run
    fake_checkpoint(tmp_path, 2)
    four = fake_checkpoint(tmp_path, 4)
    six = fake_checkpoint(tmp_path, 6)
    (six / STATES).write_bytes(b"012")  # truncated after the marker was written
    eight = fake_checkpoint(tmp_path, 8, complete=False)  # a crashed save
    ten = fake_checkpoint(tmp_path, 10)
    (ten / EXTRA).unlink()
    twelve = fake_checkpoint(tmp_path, 12)
    (twelve / MARKER).write_text("{not json")
    marker = json.loads((four / MARKER).read_text())
    assert marker["step"] == 4 and marker["world_size"] == 1
    assert marker["files"] == {EXTRA: (four / EXTRA).stat().st_size, STATES: 10}
    (tmp_path / "latest").write_text("step_00000012")  # DeepSpeed's pointer is only a hint
    with caplog.at_level(logging.WARNING, logger="megadalle"):
        assert find_resume(tmp_path, "auto") == four
    text = caplog.text
    assert f"{six}: {STATES} has 3 bytes, marker says 10" in text
    assert f"{eight}: missing COMPLETE marker" in text
    assert f"{ten}: {EXTRA} is missing" in text
    assert f"{twelve}: unreadable COMPLETE marker" in text
    assert "step_00000002" not in text  # older ones are not even looked at
    assert find_resume(tmp_path, "latest") == four  # the alias


def test_find_resume_none_and_explicit_folder(tmp_path):
    fake_checkpoint(tmp_path, 2, complete=False)
    assert find_resume(tmp_path, "none") is None  # only an incomplete leftover: starting over is allowed
    two = tmp_path / "step_00000002"
    with pytest.raises(CheckpointError, match="is not a complete checkpoint: missing COMPLETE marker"):
        find_resume(tmp_path, str(two))
    four = fake_checkpoint(tmp_path, 4)
    with pytest.raises(CheckpointError, match="holds checkpoints up to step 4.*--checkpoint.overwrite=true") as e:
        find_resume(tmp_path, "none")
    assert isinstance(e.value, ConfigError)  # train.py exits with 2
    assert find_resume(tmp_path, "none", overwrite=True) is None
    assert find_resume(tmp_path, str(four)) == four
    with pytest.raises(CheckpointError, match="no such folder"):
        find_resume(tmp_path, str(tmp_path / "elsewhere"))
    with pytest.raises(CheckpointError, match="expected auto, none, latest or a checkpoint folder"):
        find_resume(tmp_path, "")


def test_prepare_resume_moves_earlier_output_aside_never_deletes(tmp_path):
    root, metrics = tmp_path / "checkpoints", tmp_path / "metrics.jsonl"
    fake_checkpoint(root, 2)
    fake_checkpoint(root, 4)
    metrics.write_text('{"step": 1}\n')
    assert prepare_resume(root, Checkpoint(), [metrics]) == root / "step_00000004"
    assert metrics.is_file()  # a resumed run appends to it
    with pytest.raises(CheckpointError, match="up to step 4"):
        prepare_resume(root, Checkpoint(resume="none"), [metrics])
    assert prepare_resume(root, Checkpoint(resume="none", overwrite=True), [metrics]) is None
    assert not root.exists() and not metrics.exists()
    (old,) = tmp_path.glob("checkpoints.old-*")
    assert sorted(p.name for p in old.iterdir()) == ["step_00000002", "step_00000004"]
    (old_metrics,) = tmp_path.glob("metrics.old-*.jsonl")
    assert old_metrics.read_text() == '{"step": 1}\n'

    # a rollback to an explicit older folder moves the newer complete ones aside; a later auto resumes it
    two = fake_checkpoint(root, 2)
    fake_checkpoint(root, 4)
    fake_checkpoint(root, 6, complete=False)  # replaced when this history saves step 6
    assert prepare_resume(root, Checkpoint(resume=str(two)), [metrics]) == two
    assert sorted(p.name for p in root.iterdir()) == ["step_00000002", "step_00000006"]
    assert prepare_resume(root, Checkpoint(), [metrics]) == two
    assert len(list(tmp_path.glob("checkpoints.old-*"))) == 2


class BrokenEngine:
    module = torch.nn.Linear(2, 2)

    def zero_optimization_stage(self):
        return 0

    def load_checkpoint(self, load_dir, tag):
        raise RuntimeError("PytorchStreamReader failed reading zip archive")


def test_load_checkpoint_names_the_folder_not_deepspeed_internals(tmp_path):
    from megadalle.engine.schedules import LRSchedule
    from megadalle.engine.train_state import TrainState

    four = fake_checkpoint(tmp_path, 4)
    state = TrainState(BrokenEngine(), None, LRSchedule("constant", 1e-3), None)
    with pytest.raises(CheckpointError, match=f"cannot load the engine state in {four}: RuntimeError: Pytorch"):
        load_checkpoint(four, state)
    (four / EXTRA).write_bytes((four / EXTRA).read_bytes()[:50])
    with pytest.raises(CheckpointError, match=f"cannot read {four / EXTRA}"):
        load_checkpoint(four, state)


def test_load_eval_weights_takes_the_newest_complete(tmp_path):
    fake_checkpoint(tmp_path, 2)
    fake_checkpoint(tmp_path, 4, complete=False)
    weights, _ = load_eval_weights(tmp_path)
    assert weights["w"][0] == 2.0
    (tmp_path / "step_00000002" / MARKER).unlink()
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        load_eval_weights(tmp_path)


def test_atomic_save_and_ema_errors(tmp_path):
    save_atomic({"step": 1, "weights": {}, "config": ""}, tmp_path / EXTRA)
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(ValueError, match="holds no weights"):
        load_eval_weights(tmp_path)


def test_ema_math_single_process():
    m = torch.nn.Linear(3, 2)
    ema = ShardedEMA(m, decay=0.5)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    with torch.no_grad():
        for p in m.parameters():
            p.add_(2.0)
    ema.update()
    state = ema.state_dict()
    assert (state["shard"], state["shards"], state["updates"]) == (0, 1, 1)
    for n in before:
        torch.testing.assert_close(state["tensors"][n], before[n] + 1.0)
    with pytest.raises(ValueError, match=r"shape \(5,\) != parameter \(2,\)"):
        ema.load_whole("bias", torch.zeros(5))
    with pytest.raises(KeyError, match="lacks 1 parameters"):
        ema.load_state_dict({**state, "tensors": {"weight": state["tensors"]["weight"]}})
    with pytest.raises(ValueError, match="shard 1 of 2 given to shard 0 of 1"):
        ema.load_state_dict({**state, "shard": 1, "shards": 2})
    with pytest.raises(ValueError, match="decay must be in"):
        ShardedEMA(m, decay=1.0)


def test_ema_swapped_in_restores_bit_for_bit():
    m = torch.nn.Linear(3, 2)
    ema = ShardedEMA(m, decay=0.5)
    live = {n: p.detach().clone() for n, p in m.named_parameters()}
    with torch.no_grad():
        for p in m.parameters():
            p.add_(1.0 / 3.0)
    ema.update()
    after = {n: p.detach().clone() for n, p in m.named_parameters()}
    with ema.swapped_in():
        for n, p in m.named_parameters():
            torch.testing.assert_close(p, (live[n] + after[n]) / 2)
    assert all(torch.equal(p, after[n]) for n, p in m.named_parameters())


def test_ema_shards_stream_back_whole_and_old_checkpoints_load(tmp_path):
    """Shard files of a 3-way split (written as 3 ranks would) read back whole, one tensor at a time, and into an
    EMA of another layout; an old checkpoint's whole weights in extra.pt load into the EMA too."""
    from megadalle.engine.checkpoint import EMAShards, load_ema, open_eval_weights
    from megadalle.engine.ema import shard_slice
    from megadalle.engine.tensor_files import write_tensors

    g = torch.Generator().manual_seed(0)
    whole = {"a.weight": torch.randn(5, 7, generator=g), "b": torch.randn(4, generator=g)}
    shapes = {k: list(v.shape) for k, v in whole.items()}
    for i in range(3):
        meta = {"format": "megadalle-ema-shard-1", "shard": i, "shards": 3, "updates": 9, "shapes": json.dumps(shapes)}
        write_tensors(tmp_path / f"ema_shard{i:05d}.safetensors", {k: shard_slice(v, i, 3) for k, v in whole.items()},
                      meta)  # fmt: skip
    shards = EMAShards(tmp_path)
    assert all(torch.equal(shards.whole(k), v) for k, v in whole.items())
    save_atomic({"step": 3, "weights_kind": "ema", "config": "[job]\n", "format": 2}, tmp_path / EXTRA)
    w = open_eval_weights(tmp_path)
    assert (w.kind, w.step) == ("ema", 3) and all(torch.equal(t, whole[k]) for k, t in w.items())

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(7, 5, bias=False)
            self.b = torch.nn.Parameter(torch.zeros(4))

    ema = ShardedEMA(Model(), 0.9)  # one shard: another layout than the files'
    load_ema(tmp_path, {"format": 2}, ema)
    assert ema.updates == 9 and all(torch.equal(s, whole[n]) for s, (n, _) in zip(ema.shadow, ema.named))
    legacy = ShardedEMA(Model(), 0.9)
    load_ema(tmp_path, {"weights": {k: v + 1 for k, v in whole.items()}}, legacy)
    assert all(torch.equal(s, whole[n] + 1) for s, (n, _) in zip(legacy.shadow, legacy.named))
    (tmp_path / "ema_shard00001.safetensors").unlink()
    with pytest.raises(ValueError, match=r"EMA shards \[0, 2\] found, 0..2 expected"):
        EMAShards(tmp_path)
