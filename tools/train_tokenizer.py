#!/usr/bin/env python
"""Train the BPE tokenizer on the captions of the train and val data (not zeroshot), plus optional extra text.

    python tools/train_tokenizer.py --config megadalle/configs/demo.toml [--tokenizer.vocab_size=2048]

Writes `tokenizer.model_path` (and its .vocab) and prints the vocabulary size and a sample encoding.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from megadalle.config import ConfigError, Data, load_config
from megadalle.data.loader import data_splits, s3_settings, split_source
from megadalle.data.s3 import S3Error, samples
from megadalle.data.shards import shard_records
from megadalle.models.tokenizer import BPETokenizer, train_bpe


def captions(data: Data | str, splits: tuple[str, ...] = ("train", "val")) -> list[str]:
    """Caption texts (`data.caption_key`) of the given splits of `data` (the [data] section, or a shard set's path;
    any source the loaders read, local or s3://). Zero-shot captions stay unseen, like their images; a split the
    data does not have is left out."""
    data = Data(shards=data) if isinstance(data, str) else data
    settings, texts, broken = s3_settings(data), [], []

    def handler(exn: Exception) -> bool:  # a cut or corrupt tar: what can be read is used
        if isinstance(exn, S3Error):
            raise exn
        broken.append(f"{type(exn).__name__}: {exn}"[:200])
        return True

    for split in splits:
        source = split_source(data, split) if split in data_splits(data) else None
        if source is None:
            continue
        urls = [url for url, _ in shard_records(source, split, settings)]
        texts += [s[data.caption_key].decode("utf-8", errors="replace") for s in samples(urls, settings, handler)
                  if data.caption_key in s]  # fmt: skip
    if broken:
        print(f"train_tokenizer: warning: read past corrupt or cut tar data {len(broken)} times (first: "
              f"{broken[0]}); the captions before it are used", file=sys.stderr)  # fmt: skip
    return texts


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
