#!/usr/bin/env bash
# Launch `python -m sinkrec <subcommand> ...` on this node with torchrun (one process per device).
# Every node runs this with the same NNODES/NPROC/MASTER_ADDR/MASTER_PORT and its own NODE_RANK:
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 jobs/torchrun.sh fit --config conf/train/ml1m_sinkrec.yaml
# (`make train NNODES=2 NODE_RANK=0 MASTER_ADDR=...` calls this after preprocessing.)
set -euo pipefail
cd "$(dirname "$0")/.."
: "${NNODES:=1}" "${NPROC:=1}" "${NODE_RANK:=0}" "${MASTER_ADDR:=127.0.0.1}" "${MASTER_PORT:=29500}"
: "${PYTHON:=.venv/bin/python}"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.torch_extensions}"
# On SIGTERM torchrun forwards it to every rank and waits SHUTDOWN_TIMEOUT s before SIGKILL: time for
# the ranks to finish their step and write last.ckpt (sinkrec/faults.py Preemption).
: "${SHUTDOWN_TIMEOUT:=90}"
exec "$PYTHON" -m torch.distributed.run --shutdown-timeout="$SHUTDOWN_TIMEOUT" \
    --nnodes="$NNODES" --nproc_per_node="$NPROC" --node_rank="$NODE_RANK" \
    --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" \
    -m sinkrec "$@" --trainer.num_nodes "$NNODES" --trainer.devices "$NPROC"
