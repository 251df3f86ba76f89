#!/usr/bin/env bash
# "Training on your own data" (README), worked end to end on this CPU at debug size: an img2dataset-style
# download (a stand-in made from the packaged emoji art, faults included) -> manifest -> tokenizer -> dVAE ->
# token shards on 2 ranks -> prior. On a cluster the same commands run at full size, the last as
# `sbatch slurm/train_12b.sh` (see the README).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-outputs/own_data}
rm -rf "$OUT"
# 0. the download: img2dataset --output_format webdataset writes 00000.tar + 00000_stats.json ...
$PY tools/make_shards.py --config megadalle/configs/dvae_debug.toml --out "$OUT/emoji" --data.limit_per_source=300
$PY -m tests.data.img2dataset "$OUT/emoji" "$OUT/download"
DATA=(--data.shards="$OUT/download/train" --data.val_shards="$OUT/download/val")
# 1. optional: a manifest with counts and sha256 (exact skip accounting, data.verify_sha256)
$PY tools/index_shards.py --train "$OUT/download/train" --val "$OUT/download/val" --out "$OUT/index" --workers 2
# 2. the BPE tokenizer on the captions
$PY tools/train_tokenizer.py --config megadalle/configs/prior_debug.toml "${DATA[@]}" \
    --tokenizer.model_path="$OUT/tokenizer/bpe.model"
# 3. stage 1, the dVAE (on the indexed set: the same shards, with their counts)
$PY megadalle/train.py --config megadalle/configs/dvae_debug.toml --data.shards="$OUT/index" \
    --job.run_root="$OUT" --train.steps=20 --data.min_image_side=16 --data.max_aspect_ratio=3
# 4. token shards for stage 2, one per input shard, on 2 ranks (srun or torchrun on a cluster)
OMP_NUM_THREADS=1 $PY -m torch.distributed.run --standalone --nproc_per_node=2 \
    tools/encode_shards.py --checkpoint "$OUT/dvae_debug/checkpoints" --out "$OUT/tokens" --shards="$OUT/index"
# 5. stage 2, the prior
$PY megadalle/train.py --config megadalle/configs/prior_debug.toml --prior.tokens="$OUT/tokens" \
    --tokenizer.model_path="$OUT/tokenizer/bpe.model" --job.run_root="$OUT" --train.steps=20
