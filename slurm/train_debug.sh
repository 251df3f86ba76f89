#!/bin/bash
# The debug prior on CPU ranks through the 12B script's code path: ZeRO-3, two node groups of one rank with
# PowerSGD between them, the same srun launch, signals, requeue and logs (fp32: DeepSpeed has no fp16 on CPU).
#
#   TOKENS=outputs/debug/tokens TOKENIZER=outputs/debug/tokenizer/bpe.model sbatch slurm/train_debug.sh
#
# Environment as slurm/train_12b.sh (CONFIG, DS_CONFIG, TOKENS, TOKENIZER, RUN_ROOT, PYTHON); extra arguments
# go to train.py.
#SBATCH --job-name=megadalle-debug
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=2
#SBATCH --cpus-per-task=1
#SBATCH --time=00:30:00
#SBATCH --signal=USR1@60
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"

CONFIG=${CONFIG:-megadalle/configs/prior_debug.toml}
DS_CONFIG=${DS_CONFIG:-ds_configs/zero3_cpu.json}
ARGS=(
    --prior.tokens="${TOKENS:-outputs/debug/tokens}"
    --tokenizer.model_path="${TOKENIZER:-outputs/debug/tokenizer/bpe.model}"
    --job.run_root="${RUN_ROOT:-outputs}"
    --powersgd.enabled=true --powersgd.rank=4 --parallel.gpus_per_node=1
)
source slurm/launch.sh "$@"
