#!/usr/bin/env bash
# Multi-host training on a Cloud TPU VM pod slice (e.g. v5p-64): run the same command on
# every worker.
#
#   TPU=my-pod ZONE=us-east5-a scripts/tpu_pod_train.sh CONFIG [overrides]
#
# GPTJAX_DISTRIBUTED=1 makes gptjax call jax.distributed.initialize() with JAX's TPU
# cluster detection (worker addresses and ranks come from the TPU metadata). Put the run
# directory on shared storage (a gs:// bucket or an NFS/Filestore mount) so that every
# worker writes its shards of the same checkpoint. Install first on all workers:
#   gcloud compute tpus tpu-vm ssh $TPU --zone $ZONE --worker=all \
#     --command "pip install 'jax[tpu]' && pip install -e /path/to/gptjax"
set -euo pipefail
: "${TPU:?set TPU to the pod's name}" "${ZONE:?set ZONE to its zone}"
args=$(printf '%q ' "$@")
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all \
  --command "cd ~/gptjax && GPTJAX_DISTRIBUTED=1 gptjax train $args"
