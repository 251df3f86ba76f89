#!/usr/bin/env python
"""Train the BPE tokenizer on the captions of the train and val data (not zeroshot), plus optional extra text.

    python tools/train_tokenizer.py --config megadalle/configs/demo.toml [--tokenizer.vocab_size=2048]

Writes `tokenizer.model_path` (and its .vocab) and prints the vocabulary size and a sample encoding.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from megadalle.config import ConfigError, load_config
from megadalle.data.loader import captions
from megadalle.models.tokenizer import BPETokenizer, train_bpe


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = load_config(sys.argv[1:] if argv is None else argv)
        t0 = time.time()
        texts = captions(cfg.data)
        for path in cfg.tokenizer.extra_text:
            try:
                texts += Path(path).read_text(errors="replace").splitlines()
            except OSError as e:
                raise ValueError(f"tokenizer.extra_text: cannot read {path}: {e}") from None
        prefix = str(Path(cfg.tokenizer.model_path).with_suffix(""))
        model = train_bpe(texts, prefix, cfg.tokenizer.vocab_size, cfg.tokenizer.lowercase, cfg.job.seed)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"train_tokenizer: error: {e}", file=sys.stderr)
        return 2
    tok = BPETokenizer(model, cfg.tokenizer.max_len, cfg.tokenizer.dropout).eval()
    example = "Woman Mechanic, medium skin tone in openmoji style"
    ids = tok.encode(example)
    print(f"tokenizer: {model}, vocab {tok.vocab_size}, trained on {len(texts)} sentences in {time.time() - t0:.1f} s")
    print(f"  {example!r} -> {len(ids)} tokens {[tok.sp.id_to_piece(i) for i in ids]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
