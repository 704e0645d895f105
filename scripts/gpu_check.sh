#!/usr/bin/env bash
# The paper profile on one GPU in one call (python -m wff.training.gpu_check): synthesise a small dataset,
# train the paper detector and classifier at full resolution for a capped number of steps, then time both
# per test patient in PyTorch (fp32 and fp16). Writes gpu_check.json, gpu_check.txt and gpu_check.log (the
# output) to $OUT (the device machine's output folder), else the first two to runs/gpu-check. Extra
# arguments go to the module, e.g. --steps 100, or --device cpu --tiny to try it on a CPU. WFF_COMMIT names
# the commit where the copy has no .git.
#
# Runs without installing the package, on a Python that has torch and torchvision (python3, or $PYTHON):
# the folders that make up the `wff` namespace (pyproject.toml's package-dir) are linked into a temporary
# folder put first on PYTHONPATH. The one runtime dependency such a machine may lack, pydicom (a pure-Python
# wheel), is installed from .whl/ beside this checkout when it is not importable;
#   bash scripts/gpu_check.sh --prepare
# puts that wheel there, with the virtualenv's pydicom version (needs pip and the network, here, not there).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"

if [[ "${1:-}" == "--prepare" ]]; then
    version="$("$ROOT/.venv/bin/python" -c 'import importlib.metadata as m; print(m.version("pydicom"))')"
    grep -qxF "/.whl/" "$ROOT/.git/info/exclude" 2>/dev/null || echo "/.whl/" >> "$ROOT/.git/info/exclude"
    "$ROOT/.venv/bin/python" -m pip download -q --no-deps --only-binary=:all: -d "$ROOT/.whl" "pydicom==$version"
    ls -l "$ROOT"/.whl/pydicom-*.whl
    exit 0
fi

if [[ -n "${OUT:-}" ]]; then  # the device machine: the log comes back with the results, also from a run cut short
    mkdir -p "$OUT"
    exec > >(tee -a "$OUT/gpu_check.log") 2>&1
fi
BOOT="$(mktemp -d "${TMPDIR:-/tmp}/wff-boot.XXXXXX")"
trap 'rm -rf "$BOOT"' EXIT
if ! "$PYTHON" -c "import pydicom" 2>/dev/null; then
    wheels=("$ROOT"/.whl/pydicom-*.whl)
    if [[ ! -f "${wheels[0]}" ]]; then
        echo "gpu_check.sh: pydicom is not importable by $PYTHON and there is no .whl/pydicom-*.whl;" \
             "run bash scripts/gpu_check.sh --prepare where pip can reach the index, then carry .whl" >&2
        exit 1
    fi
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$BOOT/site" "${wheels[@]}"
fi
mkdir "$BOOT/wff"
for entry in "$ROOT"/src/wff/*; do
    ln -s "$entry" "$BOOT/wff/"
done
ln -s "$ROOT/ensemble" "$BOOT/wff/ensemble"
ln -s "$ROOT/client" "$BOOT/wff/client"
ln -s "$ROOT/training" "$BOOT/wff/training"
ln -s "$ROOT/model_repository" "$BOOT/wff/model_repository"
export PYTHONPATH="$BOOT:$BOOT/site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
"$PYTHON" -m wff.training.gpu_check --out "${OUT:-$ROOT/runs/gpu-check}" "$@"
