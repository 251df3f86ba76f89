#!/bin/bash
# The paper's 12B prior (Sec. 2.4-2.5, App. B.2, D, E): 128 nodes x 8 GPUs = 1,024 ranks, one sample each;
# ZeRO-3 inside each node, PowerSGD (rank 896) between nodes, fp16 with a gradient scale per resblock,
# activation checkpointing; token shards streamed from S3.
#
#   sbatch slurm/train_12b.sh                                   # as the paper
#   sbatch --nodes=16 --time=4:00:00 slurm/train_12b.sh         # any #SBATCH value, from the command line
#   TOKENS=s3://bucket/tokens/ S3_ENDPOINT=https://... sbatch slurm/train_12b.sh --train.steps=1000
#
# Environment: CONFIG, DS_CONFIG, TOKENS, TOKENIZER, RUN_ROOT, POWERSGD_RANK, PEAK_TFLOPS (for the MFU in the
# logs), S3_ENDPOINT, PYTHON; extra arguments go to train.py as --section.key=value overrides.
# SIGUSR1 arrives 180 s before the time limit: the run checkpoints and requeues itself; it resumes on restart.
#SBATCH --job-name=megadalle-12b
#SBATCH --nodes=128
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=10
#SBATCH --mem=0
#SBATCH --exclusive
#SBATCH --time=2-00:00:00
#SBATCH --signal=USR1@180
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
#SBATCH --error=%x-%j.err
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"

CONFIG=${CONFIG:-megadalle/configs/prior_12b.toml}
DS_CONFIG=${DS_CONFIG:-ds_configs/zero3_12b.json}
ARGS=(
    --prior.tokens="${TOKENS:-s3://megadalle/tokens/}"
    --tokenizer.model_path="${TOKENIZER:-outputs/tokenizer/bpe.model}"
    --job.run_root="${RUN_ROOT:-outputs}"
    --train.precision=fp16 --train.grad_scaler=per_resblock
    --powersgd.enabled=true --powersgd.rank="${POWERSGD_RANK:-896}"
    --parallel.gpus_per_node="${SLURM_NTASKS_PER_NODE:-8}"
    --logging.peak_tflops="${PEAK_TFLOPS:-125}"  # V100 fp16 tensor cores, the paper's GPUs
)
source slurm/launch.sh "$@"
