#!/usr/bin/env python
"""Build webdataset shards with captions (train / val / zeroshot) and a manifest: of emoji artwork, or of a folder
of your own images.

    python tools/make_shards.py --config megadalle/configs/demo.toml [--data.image_size=64] [--out DIR]
    python tools/make_shards.py --from-folder PHOTOS [--captions captions.csv] --out DIR [--data.val_percent=5]

Reads the [data] section of the JobConfig; `--out` defaults to `data.shards`. `--from-folder`: each image
(jpg, jpeg, png, webp) with a same-stem .txt caption, or the captions of a CSV / TSV / parquet table of path
(relative to the folder) and caption; stored as they are (megadalle/data/folder_shards.py).
"""

from __future__ import annotations

import sys

from megadalle.config import ConfigError, load_config
from megadalle.data.emoji_shards import build_emoji_shards, summary
from megadalle.data.emoji_sources import SourceError
from megadalle.data.folder_shards import build_folder_shards


def _take(argv: list[str], flag: str) -> str | None:
    if flag not in argv:
        return None
    i = argv.index(flag)
    if i + 1 >= len(argv):
        raise ConfigError(f"{flag} needs a value")
    value = argv[i + 1]
    del argv[i : i + 2]
    return value


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        out, folder, captions = (_take(argv, f) for f in ("--out", "--from-folder", "--captions"))
        cfg = load_config(argv)
        if folder is not None:
            manifest = build_folder_shards(folder, out or cfg.data.shards, cfg.data, captions)
        else:
            manifest = build_emoji_shards(cfg.data, out or cfg.data.shards, seed=cfg.job.seed)
    except (ConfigError, SourceError, ValueError, OSError) as e:
        print(f"make_shards: error: {e}", file=sys.stderr)
        return 2
    if folder is not None:
        counts = ", ".join(f"{s} {v['samples']}" for s, v in manifest["splits"].items())
        print(f"{manifest['samples']} samples of {folder} ({counts}); skipped {manifest['skipped']['by_reason']}")
    else:
        print(summary(manifest))
    print(f"manifest: {out or cfg.data.shards}/manifest.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
