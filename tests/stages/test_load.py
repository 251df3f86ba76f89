import pytest
import torch

from megadalle.models.clip import ContrastiveModel
from megadalle.models.dvae import DiscreteVAE
from megadalle.models.transformer import DallePrior
from megadalle.stages.load import load_trained, resolve_device
from tests.tiny_checkpoints import tiny_config, tiny_model, write_checkpoint

KINDS = {"dvae": DiscreteVAE, "prior": DallePrior, "clip": ContrastiveModel}


@pytest.mark.parametrize("stage", ["dvae", "prior", "clip"])
def test_fabricated_checkpoint_loads_the_saved_weights(stage, tmp_path):
    weights = {k: v.clone() for k, v in tiny_model(stage, seed=3).state_dict().items()}
    root = write_checkpoint(tmp_path / "checkpoints", weights, tiny_config(stage))
    for path in (root, root / "step_00000001", root / "step_00000001" / "extra.pt"):
        model, cfg = load_trained(path, stage)
        assert isinstance(model, KINDS[stage]) and cfg.job.stage == stage
        state = model.state_dict()
        assert state.keys() == weights.keys()
        assert all(torch.equal(state[k], weights[k]) for k in weights)
        assert not model.training and not any(p.requires_grad for p in model.parameters())
        assert all(t.device.type == "cpu" for t in [*model.parameters(), *model.buffers()])


def test_wrong_stage_names_checkpoint_and_both_stages(tmp_path):
    root = write_checkpoint(tmp_path / "ckpt", tiny_model("dvae").state_dict(), tiny_config("dvae"))
    with pytest.raises(ValueError, match=rf"checkpoint {root} holds a 'dvae' model .* but 'prior' was expected"):
        load_trained(root, "prior")
    with pytest.raises(ValueError, match="unknown stage 'vqgan'"):
        load_trained(root, "vqgan")


def test_mismatched_keys_are_listed(tmp_path):
    weights = dict(tiny_model("clip").state_dict())
    weights.pop("logit_scale")
    weights["text.extra_head.weight"] = torch.zeros(2)
    root = write_checkpoint(tmp_path / "ckpt", weights, tiny_config("clip"))
    with pytest.raises(ValueError, match=rf"{root} does not fit the clip model.*1 missing keys \[logit_scale\], "
                       r"1 unexpected keys \[text.extra_head.weight\], 0 shape mismatches"):  # fmt: skip
        load_trained(root, "clip")
    weights = dict(tiny_model("clip").state_dict())
    weights["logit_scale"] = torch.zeros(3)
    root = write_checkpoint(tmp_path / "ckpt2", weights, tiny_config("clip"))
    with pytest.raises(
        ValueError, match=r"1 shape mismatches \(checkpoint != model\) \[logit_scale \(3,\) != \(1,\)\]"
    ):
        load_trained(root, "clip")


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="unknown device 'tpu9'"):
        resolve_device("tpu9")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device is available"):
            resolve_device("cuda")
