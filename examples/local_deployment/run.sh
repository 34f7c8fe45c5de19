#!/usr/bin/env bash
# Local deployment recipe: a SuperLink and 3 SuperNodes on 127.0.0.1 with generated TLS
# certificates and SuperNode authentication keys, one tiny CollaFuse job, then every process
# stopped by pid. Prints each Flower command as it runs it, the run's status (from
# `flwr list --format json`) and the absolute path of the outputs.
#
#   bash examples/local_deployment/run.sh                 # from the repository root, venv on PATH
#   WORKDIR=/tmp/my-deploy ISOLATION=subprocess bash examples/local_deployment/run.sh
#
# APP: the Flower app folder (default: this checkout). NUM_NODES: SuperNodes to start (default 3).
# WORKDIR keeps FLWR_HOME, certificates/, keys/, logs/ and outputs/ (default: a new temp dir).
# ISOLATION: warm (default; scripts/flwr142_warm.py: one long-lived ClientApp worker per SuperNode,
# Flower 1.42 only), subprocess or process (stock Flower: a fresh ClientApp process per message).
# The job: the tiny preset (collafuse_flwr/presets/tiny.toml), EXTRA_RUN_CONFIG's keys over it.
set -euo pipefail
cd "$(dirname "$0")/../.."
WORKDIR="${WORKDIR:-$(mktemp -d -t collafuse-deploy-XXXXXX)}"
exec collafuse-deploy --num-nodes "${NUM_NODES:-3}" --isolation "${ISOLATION:-warm}" --workdir "$WORKDIR" --app "${APP:-.}" \
  --preset tiny --run-config "${EXTRA_RUN_CONFIG:-}" --quiet
