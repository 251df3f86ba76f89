"""A folder of images with captions -> a shard set with a manifest (tools/make_shards.py --from-folder).

Captions come from a same-stem `.txt` beside each image (`photos/cat.jpg` + `photos/cat.txt`), or from a CSV / TSV
/ parquet table of path (relative to the folder) and caption. Each image is stored as it is, under its own
extension (`jpg`, `jpeg`, `png`, `webp`: the loaders' `data.image_keys`), with its caption and `{"file": path}`.
Splits are by a stable hash of the path: `data.val_percent` go to val, the rest to train (the zeroshot split is
empty). An image that cannot be decoded or has no usable caption is skipped and counted by reason in the manifest.
"""

from __future__ import annotations

import csv
import time
from collections import Counter
from pathlib import Path
from typing import Any

from megadalle.config import Data
from megadalle.data.images import decode_image
from megadalle.data.shards import FORMAT, MANIFEST, ShardWriter, write_json_atomic
from megadalle.data.splits import unit_hash
from megadalle.data.stream import SkipSampleError

EXTENSIONS = {".jpg": "jpg", ".jpeg": "jpeg", ".png": "png", ".webp": "webp"}
PATH_COLUMNS = ("path", "file", "filename", "image", "url")
CAPTION_COLUMNS = ("caption", "text", "txt")


def read_caption_table(path: Path) -> dict[str, str]:
    """relative image path -> caption, from a CSV, TSV or parquet table with a path and a caption column."""
    if not path.is_file():
        raise ValueError(f"--captions {path}: no such file")
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError(f"--captions {path}: reading parquet needs pyarrow (pip install pyarrow), or give a "
                             "CSV / TSV") from None  # fmt: skip

        rows = pq.read_table(path).to_pylist()
    else:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter="\t" if path.suffix == ".tsv" else ","))
    if not rows:
        raise ValueError(f"{path}: no rows")
    columns = list(rows[0])
    pick = [next((c for c in columns if c.lower() in names), None) for names in (PATH_COLUMNS, CAPTION_COLUMNS)]
    if None in pick:
        raise ValueError(f"{path}: needs a path column ({'/'.join(PATH_COLUMNS)}) and a caption column "
                         f"({'/'.join(CAPTION_COLUMNS)}); it has {columns}")  # fmt: skip
    return {str(r[pick[0]]): str(r[pick[1]] or "") for r in rows}


def build_folder_shards(folder: str | Path, out: str | Path, data: Data, captions: str | Path | None = None) -> dict:
    """Write the shard set of `folder`'s images into `out` and return its manifest."""
    folder, out, t0 = Path(folder), Path(out), time.time()
    if not folder.is_dir():
        raise ValueError(f"--from-folder {folder}: no such folder")
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file())
    if not images:
        raise ValueError(f"--from-folder {folder}: no {'/'.join(EXTENSIONS)} images in it")
    table = read_caption_table(Path(captions)) if captions else None
    writers = {s: ShardWriter(out / s, s, data.shard_max_samples) for s in ("train", "val")}
    skipped: list[dict[str, str]] = []
    key = 0
    for path in images:
        rel = path.relative_to(folder).as_posix()
        caption = table.get(rel) if table is not None else _txt_beside(path)
        reason = None
        if caption is None or not caption.strip():
            reason = "no caption"
        elif len(caption) > data.max_caption_chars:
            reason = "over-long caption"
        raw = path.read_bytes()
        if reason is None:
            try:
                decode_image(raw)
            except SkipSampleError as e:
                reason = str(e)
        if reason is not None:
            skipped.append({"file": rel, "reason": reason})
            continue
        split = "val" if unit_hash(f"folder:{rel}") < data.val_percent / 100 else "train"
        writers[split].write({"__key__": f"{key:08d}", EXTENSIONS[path.suffix.lower()]: raw,
                              "txt": caption.strip(), "json": {"file": rel}})  # fmt: skip
        key += 1
    splits: dict[str, Any] = {}
    for s, w in writers.items():
        shards = w.close()
        splits[s] = {"samples": sum(r["samples"] for r in shards), "shards": shards}
    splits["zeroshot"] = {"samples": 0, "shards": []}
    manifest = {
        "format": FORMAT,
        "created_by": "tools/make_shards.py --from-folder",
        "source": str(folder),
        "captions": str(captions) if captions else "same-stem .txt",
        "val_percent": data.val_percent,
        "samples": key,
        "splits": splits,
        "skipped": {"total": len(skipped), "by_reason": dict(Counter(s["reason"] for s in skipped)), "items": skipped},
        "seconds": round(time.time() - t0, 2),
    }
    write_json_atomic(out / MANIFEST, manifest)
    return manifest


def _txt_beside(image: Path) -> str | None:
    txt = image.with_suffix(".txt")
    return txt.read_text(encoding="utf-8", errors="replace") if txt.is_file() else None
