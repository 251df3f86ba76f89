import pytest
import torch

from megadalle.engine.checkpoint import EXTRA, load_eval_weights, resolve_resume, save_atomic
from megadalle.engine.ema import ShardedEMA


def test_resolve_resume(tmp_path):
    assert resolve_resume(tmp_path, "") is None
    assert resolve_resume(tmp_path, "latest") is None  # nothing saved yet: a fresh start
    (tmp_path / "step_00000002").mkdir()
    (tmp_path / "step_00000002" / EXTRA).write_bytes(b"")
    (tmp_path / "latest").write_text("step_00000002")
    assert resolve_resume(tmp_path, "latest") == tmp_path / "step_00000002"
    with pytest.raises(FileNotFoundError, match="not a megadalle checkpoint"):
        resolve_resume(tmp_path, str(tmp_path / "elsewhere"))


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
    state = ema.full_state_dict()
    for n in before:
        torch.testing.assert_close(state[n], before[n] + 1.0)
    with pytest.raises(ValueError, match=r"shape \(5,\) != parameter \(2,\)"):
        ema.load_full_state_dict({**state, "bias": torch.zeros(5)})
    with pytest.raises(KeyError, match="lacks 1 parameters"):
        ema.load_full_state_dict({"weight": state["weight"]})
    with pytest.raises(ValueError, match="decay must be in"):
        ShardedEMA(m, decay=1.0)
