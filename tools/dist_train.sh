#!/usr/bin/env bash
# tools/dist_train.sh CONFIG GPUS [train.py args]
# Multi-node: NNODES=2 NODE_RANK=0|1 MASTER_ADDR=host PORT=29500 on each node.
# Without a GPU, GPUS processes train on the CPU with gloo.
exec "$(dirname "$0")/dist_run.sh" train.py "$2" "$1" "${@:3}"
