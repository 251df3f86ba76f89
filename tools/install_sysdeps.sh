#!/usr/bin/env bash
# Debian packages the tests need: Slurm (slurmctld, slurmd, client), Open MPI with pmix, g++ for DeepSpeed ops.
# Installs with apt only when running as root and something is missing; otherwise says what is missing.
set -euo pipefail
need=()
command -v slurmctld >/dev/null || need+=(slurmctld)
command -v slurmd >/dev/null || need+=(slurmd)
command -v sbatch >/dev/null || need+=(slurm-client)
command -v mpirun >/dev/null || need+=(openmpi-bin)
[ -e /usr/include/x86_64-linux-gnu/mpi/mpi.h ] || [ -e /usr/lib/x86_64-linux-gnu/openmpi/include/mpi.h ] || command -v mpicc >/dev/null || need+=(libopenmpi-dev)
command -v g++ >/dev/null || need+=(g++)
if [ ${#need[@]} -eq 0 ]; then exit 0; fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
  echo "install_sysdeps: not root (or no apt): missing ${need[*]}; their tests will skip" >&2
  exit 0
fi
echo "install_sysdeps: apt-get install ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
