"""safetensors files written and read one tensor at a time, never the whole file in memory.

The format is safetensors' own (an 8-byte little-endian header length, a JSON header of name -> dtype, shape and
byte offsets plus `__metadata__` of strings, then the raw bytes), so `safetensors.safe_open` reads these files
too. The library's own writer builds every tensor's bytes before it writes and its reader maps the file; a
checkpoint of a 12B model is written and consolidated here with one tensor in flight: the writer takes the
shapes first and the tensors from an iterator, the reader seeks to one tensor and reads it into a new tensor.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch

CODES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}  # fmt: skip
DTYPES = {code: dtype for dtype, code in CODES.items()}
HEADER_LIMIT = 100 * 2**20  # safetensors refuses larger headers too


class TensorFileError(ValueError):
    """A tensor file that is missing, cut or malformed; the message names the file."""


def _bytes_of(t: torch.Tensor) -> memoryview:
    t = t.detach().to("cpu").contiguous()
    if t.dtype not in CODES:
        raise TypeError(f"tensor of dtype {t.dtype} cannot be stored (known: {sorted(map(str, CODES))})")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def write_streamed(
    path: str | Path,
    specs: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
    produce: Callable[[str], torch.Tensor],
    metadata: Mapping[str, str] | None = None,
) -> int:
    """Write the tensors named in `specs` (name -> (dtype, shape)), each made by `produce(name)` when its turn
    comes, atomically (a temporary name, fsync, rename). Returns the file's size in bytes."""
    path = Path(path)
    header: dict[str, object] = {}
    offset = 0
    for name, (dtype, shape) in specs.items():
        n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(text)))
            f.write(text)
            for name, (dtype, shape) in specs.items():
                t = produce(name)
                if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                    raise ValueError(f"{path}: tensor {name} is {t.dtype} {tuple(t.shape)}, declared {dtype} {shape}")
                f.write(_bytes_of(t))
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)  # no half-written file left behind
        raise
    os.replace(tmp, path)
    return 8 + len(text) + offset


def write_tensors(
    path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> int:
    """Tensors already in memory, written without a copy of them all (`write_streamed`)."""
    specs = {name: (t.dtype, tuple(t.shape)) for name, t in tensors.items()}
    return write_streamed(path, specs, tensors.__getitem__, metadata)


class TensorFile:
    """One file's header, and its tensors read one at a time (`read`); the file is checked complete on opening."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if n > HEADER_LIMIT or 8 + n > size:
                    raise TensorFileError(f"{self.path}: header of {n} bytes in a file of {size}")
                header = json.loads(f.read(n))
        except FileNotFoundError:
            raise TensorFileError(f"no tensor file {self.path}") from None
        except (struct.error, ValueError) as e:
            if isinstance(e, TensorFileError):
                raise
            raise TensorFileError(f"{self.path}: not a safetensors file ({type(e).__name__}: {e})") from None
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._start = 8 + n
        self._entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        end = 0
        for name, e in header.items():
            if e.get("dtype") not in DTYPES:
                raise TensorFileError(f"{self.path}: tensor {name} has unknown dtype {e.get('dtype')!r}")
            begin, stop = e["data_offsets"]
            self._entries[name] = (DTYPES[e["dtype"]], tuple(e["shape"]), begin, stop)
            end = max(end, stop)
        if self._start + end != size:
            raise TensorFileError(f"{self.path}: {size} bytes, its header accounts for {self._start + end} (cut short "
                                  "or written by something else)")  # fmt: skip

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def spec(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        dtype, shape, _, _ = self._entries[name]
        return dtype, shape

    def read(self, name: str, into: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor `name`: a new CPU tensor, or read straight into `into` (contiguous, CPU, same dtype and
        number of elements)."""
        if name not in self._entries:
            raise TensorFileError(f"{self.path} has no tensor {name!r}")
        dtype, shape, begin, stop = self._entries[name]
        out = torch.empty(shape, dtype=dtype) if into is None else into
        if out.dtype != dtype or out.numel() != torch.Size(shape).numel() or not out.is_contiguous():
            raise ValueError(f"{self.path}: cannot read {name} ({dtype} {shape}) into {out.dtype} {tuple(out.shape)}")
        if stop > begin:
            view = out.reshape(-1).view(torch.uint8).numpy()
            with open(self.path, "rb") as f:
                f.seek(self._start + begin)
                got = f.readinto(view)
            if got != stop - begin:
                raise TensorFileError(f"{self.path}: tensor {name} cut short ({got} of {stop - begin} bytes)")
        return out

    def items(self) -> Iterable[tuple[str, torch.Tensor]]:
        for name in self._entries:
            yield name, self.read(name)
