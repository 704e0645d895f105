#!/usr/bin/env bash
# Create .venv at the repository root and install spine-wff with everything it needs (all extras).
# Sourced by scripts/demo.sh and scripts/test.sh; safe to run again (it only installs what is missing).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
if [ ! -x "$ROOT/.venv/bin/python" ]; then
    echo "creating $ROOT/.venv" >&2
    "$PY" -m venv "$ROOT/.venv"
fi
# System packages the server and the tests use, from the distribution's archive when this runs as root
# on Debian/Ubuntu: libjemalloc2 (tritonserver's allocator; the soak passes with it, BENCHMARKS.md),
# prometheus (promtool checks the shipped rules; the monitoring test scrapes a running server with it),
# orthanc and orthanc-dicomweb (the PACS the gateway's tests store into and read back from), dcmtk
# (storescu, echoscu) and dicom3tools (dciodvfy validates the SR and presentation state).
# Elsewhere install them by hand; the server warns at start-up when it runs without jemalloc.
SYSTEM_PACKAGES=(libjemalloc2 prometheus orthanc orthanc-dicomweb dcmtk dicom3tools)
SYSTEM_STAMP="$ROOT/.venv/.wff-system-packages"
if [ "$(cat "$SYSTEM_STAMP" 2> /dev/null)" != "${SYSTEM_PACKAGES[*]}" ] && [ "$(id -u)" = 0 ] && command -v apt-get > /dev/null; then
    missing=()
    for pkg in "${SYSTEM_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2> /dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        echo "installing ${missing[*]} with apt-get (first time: about a minute)" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq > /dev/null
        apt-get install -y -qq --no-install-recommends "${missing[@]}" > /dev/null
    fi
    echo "${SYSTEM_PACKAGES[*]}" > "$SYSTEM_STAMP"
fi
# spine-wff itself, editable, with every extra: serve (tritonserver, runtimes), train (torch), pacs
# (DICOM network, DICOMweb, SR), dev (tests). The stamp holds the extras and pyproject.toml's hash, so a changed dependency list or
# extras layout installs again on the next run.
EXTRAS="serve,train,pacs,dev"
STAMP="$ROOT/.venv/.wff-installed"
PYPROJECT_SHA256="$("$ROOT/.venv/bin/python" -c 'import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest())' "$ROOT/pyproject.toml")"
WANTED="extras=$EXTRAS pyproject.toml=$PYPROJECT_SHA256"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANTED" ]; then
    echo "installing spine-wff[$EXTRAS] and its dependencies into .venv (first time: about 1-2 minutes)" >&2
    "$ROOT/.venv/bin/python" -m pip install --quiet --upgrade pip
    "$ROOT/.venv/bin/python" -m pip install --quiet -e "$ROOT[$EXTRAS]"
    echo "$WANTED" > "$STAMP"
fi
