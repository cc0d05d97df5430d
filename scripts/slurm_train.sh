#!/usr/bin/env bash
# Multi-host training under SLURM: one process per GPU, on every node of the allocation.
#
#   sbatch --nodes=2 --gres=gpu:8 --ntasks-per-node=8 scripts/slurm_train.sh CONFIG [overrides]
#
# gptjax sees SLURM_NTASKS > 1 and calls jax.distributed.initialize(), which reads the
# coordinator (the first node), the process count and this task's rank from SLURM's
# environment. Nothing in the training config changes between 1 and N processes: the
# mesh's -1 axis absorbs the extra devices, each process loads only its slice of every
# global batch, and process 0 alone writes logs, samples and metrics. Checkpoints are
# written by every process (orbax), so the run directory must be on a filesystem every
# node sees.
#SBATCH --job-name=gptjax
#SBATCH --time=24:00:00
#SBATCH --signal=TERM@120   # SIGTERM two minutes before the end: every process saves the same step
set -euo pipefail
srun --kill-on-bad-exit=1 gptjax train "$@"
