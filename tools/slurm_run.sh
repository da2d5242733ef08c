#!/usr/bin/env bash
# tools/slurm_run.sh SCRIPT PARTITION JOB_NAME [SCRIPT args]: run tools/SCRIPT
# as GPUS Slurm tasks, --launcher slurm appended. GPUS (default 8),
# GPUS_PER_NODE (8), CPUS_PER_TASK (5), SRUN_ARGS. Used by slurm_train.sh
# and slurm_test.sh.
set -x
TOOLS="$(cd "$(dirname "$0")" && pwd)"
SCRIPT=$1
PARTITION=$2
JOB_NAME=$3
GPUS=${GPUS:-8}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
PYTHONPATH="$TOOLS/..":${PYTHONPATH:-} \
srun -p "${PARTITION}" \
    --job-name="${JOB_NAME}" \
    --gres=gpu:"${GPUS_PER_NODE}" \
    --ntasks="${GPUS}" \
    --ntasks-per-node="${GPUS_PER_NODE}" \
    --cpus-per-task="${CPUS_PER_TASK:-5}" \
    --kill-on-bad-exit=1 \
    ${SRUN_ARGS:-} \
    "${PYTHON:-python}" -u "$TOOLS/$SCRIPT" "${@:4}" --launcher=slurm
