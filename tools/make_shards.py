#!/usr/bin/env python
"""Build webdataset shards of emoji artwork with captions (train / val / zeroshot) and a manifest.

    python tools/make_shards.py --config megadalle/configs/demo.toml [--data.image_size=64] [--out DIR]

Reads the [data] section of the JobConfig; `--out` defaults to `data.shards`.
"""

from __future__ import annotations

import sys

from megadalle.config import ConfigError, load_config
from megadalle.data.emoji_shards import build_emoji_shards, summary
from megadalle.data.emoji_sources import SourceError


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    out = None
    if "--out" in argv:
        i = argv.index("--out")
        out = argv[i + 1]
        del argv[i : i + 2]
    try:
        cfg = load_config(argv)
        manifest = build_emoji_shards(cfg.data, out or cfg.data.shards, seed=cfg.job.seed)
    except (ConfigError, SourceError, ValueError) as e:
        print(f"make_shards: error: {e}", file=sys.stderr)
        return 2
    print(summary(manifest))
    print(f"manifest: {out or cfg.data.shards}/manifest.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
