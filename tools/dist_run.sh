#!/usr/bin/env bash
# tools/dist_run.sh SCRIPT NPROC [SCRIPT args]: run tools/SCRIPT in NPROC
# processes on this node with torchrun, --launcher pytorch appended.
# Multi-node: NNODES, NODE_RANK, MASTER_ADDR, PORT. Without a GPU the
# processes run on the CPU with gloo (mmge.engine.setup_runtime).
# Used by dist_train.sh and dist_test.sh.
TOOLS="$(cd "$(dirname "$0")" && pwd)"
SCRIPT=$1
NPROC=$2
PYTHONPATH="$TOOLS/..":${PYTHONPATH:-} \
"${PYTHON:-python}" -m torch.distributed.run \
    --nnodes="${NNODES:-1}" \
    --node_rank="${NODE_RANK:-0}" \
    --master_addr="${MASTER_ADDR:-127.0.0.1}" \
    --nproc_per_node="$NPROC" \
    --master_port="${PORT:-29500}" \
    "$TOOLS/$SCRIPT" "${@:3}" --launcher pytorch
