"""Tensor files written and read one tensor at a time: safetensors' own format, checked against its reader."""

import pytest
import torch
from safetensors import safe_open

from megadalle.engine.tensor_files import TensorFile, TensorFileError, write_streamed, write_tensors


def tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(3, 5, generator=g),
        "half": torch.randn(7, generator=g).half(),
        "bf": torch.randn(2, 3, generator=g).bfloat16(),
        "ids": torch.arange(11),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "mask": torch.tensor([True, False, True]),
    }


def test_round_trip_and_safetensors_reads_it(tmp_path):
    path = tmp_path / "t.safetensors"
    size = write_tensors(path, tensors(), {"format": "x", "n": 3})
    assert size == path.stat().st_size and not list(tmp_path.glob("*.tmp"))
    f = TensorFile(path)
    assert f.metadata == {"format": "x", "n": "3"} and f.keys() == list(tensors())
    for name, t in tensors().items():
        assert torch.equal(f.read(name), t) and f.read(name).dtype == t.dtype
    into = torch.empty(15)
    assert f.read("w", into=into) is into and torch.equal(into.view(3, 5), tensors()["w"])
    with safe_open(str(path), framework="pt") as g:  # the library's reader agrees
        assert g.metadata() == {"format": "x", "n": "3"}
        for name, t in tensors().items():
            assert torch.equal(g.get_tensor(name), t)


def test_streamed_writer_produces_in_order_and_checks_declarations(tmp_path):
    made = []

    def produce(name):
        made.append(name)
        return torch.full((2,), float(len(made)))

    write_streamed(tmp_path / "s.safetensors", {"a": (torch.float32, (2,)), "b": (torch.float32, (2,))}, produce)
    assert made == ["a", "b"] and TensorFile(tmp_path / "s.safetensors").read("b").tolist() == [2.0, 2.0]
    with pytest.raises(ValueError, match=r"tensor a is torch.float32 \(2,\), declared torch.float16"):
        write_streamed(tmp_path / "bad.safetensors", {"a": (torch.float16, (2,))}, produce)
    assert not (tmp_path / "bad.safetensors").exists()


def test_cut_and_foreign_files_are_named(tmp_path):
    path = tmp_path / "t.safetensors"
    write_tensors(path, tensors())
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(TensorFileError, match=f"{path}: .* bytes, its header accounts for"):
        TensorFile(path)
    (tmp_path / "junk").write_bytes(b"\xff" * 64)
    with pytest.raises(TensorFileError, match="junk: header of"):
        TensorFile(tmp_path / "junk")
    with pytest.raises(TensorFileError, match="no tensor file"):
        TensorFile(tmp_path / "missing")
    write_tensors(path, tensors())
    with pytest.raises(TensorFileError, match="has no tensor 'nope'"):
        TensorFile(path).read("nope")
