#!/usr/bin/env bash
# The GPU comparison (issue 15): MNIST-5k at 28 px, base UNet, T=1000, in process (no SuperLink/Ray).
# On the lent machine, from the repo root, with .gpu_site carried (built here by scripts/gpu_site.sh):
#   bash scripts/gpu_run.sh        # -> $OUT: report.md results.csv sweep.json log.txt runs.tgz + 3 plots
# The sweep is cut at SWEEP_S (480) s and sized to fit by --time-budget; whatever finished is reported.
set -u
R=$(pwd); O=${OUT:-/tmp/gpu-out}; S=/tmp/gpu-sweep; PY=${PY:-python3}; B=${SWEEP_S:-480}; mkdir -p "$O"
nvidia-smi -L; $PY -c 'import sys,torch;print(sys.version.split()[0],torch.__version__,torch.version.cuda,torch.cuda.is_available())'
export PYTHONPATH=$R:$R/.gpu_site COLLAFUSE_FLWR_CACHE=/tmp/cf-cache MPLBACKEND=Agg PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
timeout -k 15 "$B" $PY -m benchmarks.sweep --preset gpu --engine inprocess --out $S --no-report \
  --time-budget $((B - 60)) "$@" 2>&1 | grep -v -e UserWarning -e 'warnings.warn(' > "$O/log.txt"
tail -n 30 "$O/log.txt"
$PY -m benchmarks.report $S 2>&1 | tail -n 8
cp $S/report.md $S/results.csv $S/sweep.json "$O/"
(cd $S && tar czf "$O/runs.tgz" runs/*/results.json runs/*/metrics.csv runs/*/sweep.json runs/*/flwr.log 2>/dev/null)
for p in fid_vs_c disclosure_vs_c samples_by_method; do cp $S/$p.png "$O/" 2>/dev/null; done
ls -la "$O"
