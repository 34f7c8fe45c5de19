#!/usr/bin/env bash
# Local deployment recipe: a SuperLink and 3 SuperNodes on 127.0.0.1 with generated TLS
# certificates and SuperNode authentication keys, one tiny CollaFuse job, then every process
# stopped by pid. Prints each Flower command as it runs it, the run's status (from
# `flwr list --format json`) and the absolute path of the outputs.
#
#   bash examples/local_deployment/run.sh                 # from the repository root, venv on PATH
#   WORKDIR=/tmp/my-deploy ISOLATION=subprocess bash examples/local_deployment/run.sh
#
# APP: the Flower app folder (default: this checkout).
# WORKDIR keeps FLWR_HOME, certificates/, keys/, logs/ and outputs/ (default: a new temp dir).
# ISOLATION: warm (default; one long-lived ClientApp worker per SuperNode) or subprocess
# (Flower's stock SuperNode: a fresh ClientApp process per message).
set -euo pipefail
cd "$(dirname "$0")/../.."
WORKDIR="${WORKDIR:-$(mktemp -d -t collafuse-deploy-XXXXXX)}"
RUN_CONFIG="num-server-rounds=2 model-size='tiny' diffusion-steps=20 local-steps=2 server-steps=2 \
uploads-per-round=8 num-eval-samples=4 batch-size=16 ${EXTRA_RUN_CONFIG:-}"
exec collafuse-deploy --num-nodes 3 --isolation "${ISOLATION:-warm}" --workdir "$WORKDIR" --app "${APP:-.}" \
  --run-config "$RUN_CONFIG" --quiet
