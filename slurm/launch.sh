# Sourced by the sbatch scripts after they set CONFIG, DS_CONFIG and the ARGS array: one srun step, one task per
# GPU (or CPU rank), each a `train.py` that finds its rank in the Slurm environment (engine/launcher.py).
# --kill-on-bad-exit: one task that fails ends the step, so no rank waits forever on a dead one.
# SRUN_MPI=pmix launches through PMIx with MEGADALLE_RENDEZVOUS=mpi (mpi4py discovery) instead.

source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
if [ -n "${SRUN_MPI:-}" ]; then export MEGADALLE_RENDEZVOUS=mpi; MPI_FLAG=(--mpi="$SRUN_MPI"); else MPI_FLAG=(); fi
echo "megadalle: job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NUM_NODES} nodes x" \
     "${SLURM_NTASKS_PER_NODE:-?} tasks, master ${MASTER_ADDR}:${MASTER_PORT}, config ${CONFIG}"
srun --kill-on-bad-exit=1 --cpu-bind=none "${MPI_FLAG[@]}" \
    "$PYTHON" megadalle/train.py --config "$CONFIG" --deepspeed_config "$DS_CONFIG" "${ARGS[@]}" "$@"
