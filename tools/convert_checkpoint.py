#!/usr/bin/env python
"""Checkpoint conversions: consolidated exports, resharding to another world size, OpenAI's dVAE release.

    python tools/convert_checkpoint.py export CKPT --out model.safetensors [--weights ema|live] [--dtype fp32]
    python tools/convert_checkpoint.py reshard CKPT --out NEW/checkpoints --world M
    python tools/convert_checkpoint.py import-openai-dvae encoder.pkl decoder.pkl --out outputs/dvae_openai
    (every subcommand takes --verify [--tol T]; `SUBCOMMAND --help` says more)

CKPT is a checkpoint folder (`<run>/checkpoints/step_NNNNNNNN`) or a run's `checkpoints/` folder (its newest
complete checkpoint), written by train.py with DeepSpeed at any ZeRO stage and world size.

--verify loads both sides, runs the same fixed batch through the model built from each (the dVAE's encoder
logits and decoder output, the prior's text and image logits, the reranker's embeddings), prints the largest
absolute difference of the outputs (and, for reshard, of the weights and Adam moments), and exits 1 when it is
above --tol (default: 0 for fp32 and resharding, where the conversion moves bits without arithmetic; 2e-2 for
fp16 and 1e-1 for bf16 exports, which round the weights).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():  # DeepSpeed, imported below, would warn that it picks the CPU: name it first
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

from megadalle.engine.consolidate import ConversionError  # noqa: E402
from megadalle.engine.convert import (  # noqa: E402
    DTYPES,
    checkpoint_folder,
    export,
    import_openai_dvae,
    reshard,
    reshard_rank,
)
from megadalle.engine.denormals import flush_denormals  # noqa: E402

# --- command line ------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    flush_denormals()  # before the first torch operation starts the thread pool
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--verify", action="store_true", help="compare both sides on a fixed batch (see above)")
        p.add_argument("--tol", type=float, default=None, help="largest allowed difference for --verify")

    p = sub.add_parser("export", help="a checkpoint -> one safetensors file + its config as JSON",
                       description="A checkpoint of any ZeRO stage and world size -> OUT.safetensors (the weights, "
                       "config in its metadata) and OUT.json (stage, step, config, model sizes). Sampling loads it "
                       "without DeepSpeed: python -m megadalle.sample --prior OUT.safetensors ...")  # fmt: skip
    p.add_argument("checkpoint")
    p.add_argument("--out", required=True, help="the .safetensors file to write")
    p.add_argument("--weights", choices=["ema", "live"], default="ema",
                   help="the EMA kept by the run (default), or the live weights from the ZeRO shards")  # fmt: skip
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    common(p)
    p = sub.add_parser("reshard", help="a ZeRO-3 checkpoint of N ranks -> one that resumes on M ranks",
                       description="Rewrites a ZeRO-3 checkpoint for --world M ranks with the optimizer state "
                       "(fp32 master weights, Adam moments, step), the EMA, the lr schedule and the gradient "
                       "scales; launches M CPU processes itself (or runs as one rank of M when started by "
                       "torchrun / srun). Each rank reads the source one parameter at a time and keeps its share. "
                       "Data positions and generators belong to the old world size: they are kept "
                       "in from_world_<N>/ and come back when the run resumes on N ranks; on M ranks the data "
                       "streams start over.")  # fmt: skip
    p.add_argument("checkpoint")
    p.add_argument("--out", required=True, help="a checkpoints/ folder for the new step_NNNNNNNN folder")
    p.add_argument("--world", type=int, required=True, help="the new number of ranks")
    common(p)
    p = sub.add_parser("reshard-rank", help=argparse.SUPPRESS)  # one rank of a reshard's own launch
    p.add_argument("checkpoint")
    p.add_argument("--out", required=True)
    p = sub.add_parser("import-openai-dvae", help="OpenAI's released encoder.pkl / decoder.pkl -> a dVAE checkpoint",
                       description="OpenAI's dall-e release pickles whole modules. They are unpickled with torch's "
                       "weights_only unpickler, allowing only the classes they are made of (dall_e's Encoder, "
                       "Decoder, their blocks and Conv2d; torch's Sequential, ReLU, MaxPool2d, Upsample, "
                       "Identity): a file that needs anything else is refused, never executed. The sizes must be "
                       "one of megadalle's dVAE flavors (the release is `paper`). Writes "
                       "OUT/checkpoints/step_00000000/ for load_trained, sampling and encode_shards.")  # fmt: skip
    p.add_argument("encoder")
    p.add_argument("decoder")
    p.add_argument("--out", required=True, help="a run folder")
    common(p)
    a = ap.parse_args(argv)
    try:
        if a.command == "export":
            return export(a.checkpoint, a.out, a.weights, a.dtype, a.verify, a.tol)
        if a.command == "reshard":
            return reshard(a.checkpoint, a.out, a.world, a.verify, a.tol)
        if a.command == "reshard-rank":
            reshard_rank(checkpoint_folder(a.checkpoint), Path(a.out))
            return 0
        return import_openai_dvae(a.encoder, a.decoder, a.out, a.verify, a.tol)
    except (ConversionError, ValueError, FileNotFoundError) as e:
        print(f"convert_checkpoint {a.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
