# Environment of every megadalle job step, sourced by the sbatch scripts on the batch node; srun passes it on to
# every task. Values already set by the caller win.

export PYTHONUNBUFFERED=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
# srun does not inherit the batch step's --cpus-per-task since Slurm 22.05: pass it on explicitly
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK; fi
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/build/torch_extensions}  # DeepSpeed's compiled ops, reused

# Rendezvous: the job's first node and a port derived from the job id (megadalle/engine/launcher.py derives the
# same when these are unset). A requeued job keeps its id, so it finds the same port.
export MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 10000))}  # below Linux's ephemeral ports

# NCCL: a failed or timed-out collective aborts the process instead of hanging; warnings only.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-^lo,docker}  # bootstrap over the nodes' real interface
# InfiniBand / RoCE: set NCCL_IB_HCA (e.g. mlx5) and NCCL_IB_GID_INDEX as the cluster's documentation says.

# S3 (data.shards / prior.tokens = s3://bucket/prefix/): the endpoint for non-AWS stores, and the region.
# Credentials come from boto3's standard chain on the nodes (instance role, AWS_PROFILE, ~/.aws); never here.
if [ -n "${S3_ENDPOINT:-}" ]; then export AWS_ENDPOINT_URL=$S3_ENDPOINT; fi
export AWS_DEFAULT_REGION=${AWS_DEFAULT_REGION:-us-east-1}

# The interpreter: the repository's virtual environment when there is one.
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=$PWD/.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHON
