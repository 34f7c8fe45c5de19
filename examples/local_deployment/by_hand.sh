#!/usr/bin/env bash
# The "By hand" commands of examples/README.md, verbatim, plus waiting and cleanup: a SuperLink
# and 3 stock SuperNodes on 127.0.0.1 (ports 9093-9096 must be free), TLS, SuperNode
# authentication, one tiny CollaFuse job; every process it started is stopped by pid at exit.
#   bash examples/local_deployment/by_hand.sh            # from anywhere; runs in the repo root
set -euo pipefail
cd "$(dirname "$0")/../.."
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do pkill -TERM -P "$p" 2>/dev/null || true; kill "$p" 2>/dev/null || true; done; wait || true; }
trap cleanup EXIT

export DEPLOY=/tmp/collafuse-deploy               # certificates, keys, state, outputs (outside the app folder)
rm -rf "$DEPLOY"                                  # (script only: start clean)
export FLWR_HOME=$DEPLOY/flwr-home                # where flwr keeps config.toml and installed apps
mkdir -p $DEPLOY/certificates $DEPLOY/keys "$FLWR_HOME"

# 1. TLS: a CA and a server certificate for 127.0.0.1/localhost (any CA works; this one uses `cryptography`)
python -c "from pathlib import Path; from collafuse_flwr.tools.deploy_keys import make_tls; make_tls(Path('$DEPLOY/certificates'))"

# 2. The SuperLink, with TLS, SuperNode authentication and a persistent state database
flower-superlink --host 127.0.0.1 --port 9093 \
  --ssl-ca-certfile $DEPLOY/certificates/ca.crt --ssl-certfile $DEPLOY/certificates/server.pem \
  --ssl-keyfile $DEPLOY/certificates/server.key \
  --enable-supernode-auth --disable-runtime-dependency-installation --database $DEPLOY/state.db &
PIDS+=($!)

# 3. The federation entry `flwr` uses (address = the SuperLink's --host:--port)
cat > "$FLWR_HOME/config.toml" <<TOML
[superlink]
default = "my-deployment"

[superlink.my-deployment]
address = "127.0.0.1:9093"
root-certificates = "$DEPLOY/certificates/ca.crt"
TOML
until flwr list my-deployment --format json 2>/dev/null | grep -q '"runs"'; do sleep 1; done   # rc 0 even when unreachable

# 4. One key pair per SuperNode (EC P-384 in OpenSSH format), registered with the SuperLink
for k in 0 1 2; do
  ssh-keygen -q -t ecdsa -b 384 -N "" -f $DEPLOY/keys/supernode-$k
  flwr supernode register $DEPLOY/keys/supernode-$k.pub my-deployment
done

# 5. The SuperNodes: each with its key, its own Runtime API port and its node_config
for k in 0 1 2; do
  flower-supernode --superlink 127.0.0.1:9093 --root-certificates $DEPLOY/certificates/ca.crt \
    --auth-supernode-private-key $DEPLOY/keys/supernode-$k --host 127.0.0.1 --port $((9094 + k)) \
    --node-config "partition-id=$k num-partitions=3 state-dir='$DEPLOY/node-state/$k'" &
  PIDS+=($!)
done
flwr supernode ls my-deployment            # wait until all three are `online`
until [ "$(flwr supernode ls my-deployment --format json | grep -o '"online"' | wc -l)" -eq 3 ]; do sleep 1; done

# 6. The job; outputs go to output-dir on the SuperLink's machine
FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 flwr run . my-deployment --stream \
  --run-config "num-server-rounds=2 model-size='tiny' diffusion-steps=20 output-dir='$DEPLOY/outputs'"
flwr list my-deployment --format json      # the real status: "finished:completed"
