#!/usr/bin/env bash
# spine-wff container entrypoint.
#
#   wff-entrypoint prepare           build the Triton repository (and TensorRT plans) if missing, then exit
#   wff-entrypoint serve [ARGS...]   prepare, then exec tritonserver (ARGS go to tritonserver)
#   wff-entrypoint COMMAND...        run anything else (e.g. bash, wff trt check ...)
#
# The repository is generated from the `wff train` output in $WFF_ARTIFACTS into
# $WFF_STATE/repository, and regenerated when those artifacts change (their sha256 sums are
# kept in $WFF_STATE/artifacts.sha256). For the tensorrt target, `wff trt build` then builds
# and verifies model.plan for the detector and classifier; it skips plans that are up to date,
# so a restart costs seconds, and the first start on a new GPU costs the plan builds.
set -euo pipefail

ARTIFACTS="${WFF_ARTIFACTS:-/models/artifacts}"
STATE="${WFF_STATE:-/models/state}"
REPOSITORY="$STATE/repository"
TARGET="${WFF_TARGET:-tensorrt}"                      # tensorrt | onnxruntime | embedded
INSTANCE_KIND="${WFF_INSTANCE_KIND:-}"                # KIND_CPU for the CPU variant
PRECISION="${WFF_TRT_PRECISION:-fp16}"                # fp16 | fp32
WORKSPACE_MIB="${WFF_TRT_WORKSPACE_MIB:-4096}"
TIMING_CACHE="${WFF_TRT_TIMING_CACHE:-$STATE/tensorrt_timing.cache}"
# Python backend shared memory per model instance: a patient's slices are (S, 1, 512, 512)
# float32, about 88 MB for 84 slices, so start at 64 MiB and grow by 64 MiB. /dev/shm must be
# large enough for every Python instance (compose: shm_size; Kubernetes: a memory emptyDir).
SHM_DEFAULT_BYTES="${WFF_PYTHON_SHM_DEFAULT_BYTES:-67108864}"
SHM_GROWTH_BYTES="${WFF_PYTHON_SHM_GROWTH_BYTES:-67108864}"
LOG_VERBOSE="${WFF_LOG_VERBOSE:-0}"
# tritonserver's allocator: under sustained load glibc's malloc kept the server process growing
# (BENCHMARKS.md, soak); the NGC image ships jemalloc. jemalloc | glibc | a library path. The
# Python-backend stubs keep glibc: a stub wrapper in $STATE/backends clears LD_PRELOAD for them.
SERVER_MALLOC="${WFF_SERVER_MALLOC:-jemalloc}"
TRITON_BACKENDS="${WFF_TRITON_BACKENDS:-/opt/tritonserver/backends}"

log() { echo "[wff-entrypoint] $*" >&2; }

artifact_sums() {
    (cd "$ARTIFACTS" && sha256sum profile.json detector.onnx classifier.onnx age_prior.json fusion.json)
}

prepare() {
    if [[ ! -f "$ARTIFACTS/profile.json" ]]; then
        log "no wff train output in $ARTIFACTS (profile.json, detector.onnx, classifier.onnx, age_prior.json, fusion.json)"
        log "mount one there, e.g. -v \$PWD/runs/paper:/models/artifacts:ro"
        exit 2
    fi
    mkdir -p "$STATE"
    local sums
    sums="$(artifact_sums)"
    if [[ ! -f "$REPOSITORY/wff_diagnosis/config.pbtxt" || "$sums" != "$(cat "$STATE/artifacts.sha256" 2>/dev/null)" ]]; then
        log "building the $TARGET repository from $ARTIFACTS into $REPOSITORY"
        local kind=()
        [[ -n "$INSTANCE_KIND" ]] && kind=(--instance-kind "$INSTANCE_KIND")
        wff repo build --target "$TARGET" --artifacts "$ARTIFACTS" "${kind[@]}" --force "$REPOSITORY"
        printf '%s\n' "$sums" > "$STATE/artifacts.sha256"
    fi
    if [[ "$TARGET" == tensorrt ]]; then
        wff trt build "$REPOSITORY" --precision "$PRECISION" --workspace-mib "$WORKSPACE_MIB" --timing-cache "$TIMING_CACHE"
    fi
}

server_preload() {  # prints the library to preload into tritonserver (nothing for glibc)
    case "$SERVER_MALLOC" in
        glibc) ;;
        jemalloc)
            local lib
            for lib in /usr/lib/x86_64-linux-gnu/libjemalloc.so.2 /usr/lib/aarch64-linux-gnu/libjemalloc.so.2 /usr/lib64/libjemalloc.so.2; do
                [[ -f "$lib" ]] && { echo "$lib"; return; }
            done
            log "WFF_SERVER_MALLOC=jemalloc but libjemalloc.so.2 is not installed: tritonserver runs on glibc malloc" ;;
        *)
            [[ -f "$SERVER_MALLOC" ]] || { log "WFF_SERVER_MALLOC=$SERVER_MALLOC: no such library (jemalloc, glibc or a path)"; exit 2; }
            echo "$SERVER_MALLOC" ;;
    esac
}

stub_backends() {  # $TRITON_BACKENDS with a Python stub that does not inherit LD_PRELOAD; prints its path
    local dst="$STATE/backends" item
    if [[ ! -f "$TRITON_BACKENDS/python/triton_python_backend_stub" ]]; then
        log "no Python backend stub in $TRITON_BACKENDS/python (set WFF_TRITON_BACKENDS, or WFF_SERVER_MALLOC=glibc)"
        exit 2
    fi
    rm -rf "$dst"
    mkdir -p "$dst/python"
    for item in "$TRITON_BACKENDS"/*; do
        [[ "$(basename "$item")" == python ]] || ln -s "$item" "$dst/"
    done
    for item in "$TRITON_BACKENDS"/python/*; do
        [[ "$(basename "$item")" == triton_python_backend_stub ]] || ln -s "$item" "$dst/python/"
    done
    printf '#!/bin/sh\nunset LD_PRELOAD\nexec %q "$@"\n' "$TRITON_BACKENDS/python/triton_python_backend_stub" > "$dst/python/triton_python_backend_stub"
    chmod 755 "$dst/python/triton_python_backend_stub"
    echo "$dst"
}

serve() {
    prepare
    local preload backend_args=()
    preload="$(server_preload)"
    if [[ -n "$preload" ]]; then
        local backends
        backends="$(stub_backends)"
        backend_args=(--backend-directory="$backends")
        export LD_PRELOAD="$preload"
        log "tritonserver allocator: $preload (backend stubs: glibc)"
    fi
    local gpu_metrics=true
    [[ "$INSTANCE_KIND" == KIND_CPU ]] && gpu_metrics=false
    log "starting tritonserver on $REPOSITORY (HTTP 8000, gRPC 8001, metrics 8002)"
    exec tritonserver \
        --model-repository="$REPOSITORY" \
        --http-port=8000 --grpc-port=8001 --metrics-port=8002 \
        --allow-metrics=true --allow-gpu-metrics="$gpu_metrics" \
        --backend-config=python,shm-default-byte-size="$SHM_DEFAULT_BYTES" \
        --backend-config=python,shm-growth-byte-size="$SHM_GROWTH_BYTES" \
        --exit-on-error=true \
        --log-verbose="$LOG_VERBOSE" \
        "${backend_args[@]}" \
        "$@"
}

case "${1:-serve}" in
    prepare) prepare ;;
    serve) shift || true; serve "$@" ;;
    *) exec "$@" ;;
esac
