#!/usr/bin/env bash
# spine-wff container entrypoint.
#
#   wff-entrypoint prepare           build the Triton repository (and TensorRT plans) if missing, then exit
#   wff-entrypoint serve [ARGS...]   prepare, then exec `wff serve` (ARGS go on to tritonserver)
#   wff-entrypoint COMMAND...        run anything else (e.g. bash, wff trt check ...)
#
# The repository is generated from the `wff train` output in $WFF_ARTIFACTS into
# $WFF_STATE/repository, and regenerated when those artifacts change (their sha256 sums are
# kept in $WFF_STATE/artifacts.sha256). For the tensorrt target, `wff trt build` then builds
# and verifies model.plan for the detector and classifier; it skips plans that are up to date,
# so a restart costs seconds, and the first start on a new GPU costs the plan builds.
#
# `serve` runs the image's tritonserver under `wff serve`, which reloads a model whose
# Python-backend stub died (Triton alone keeps reporting ready while every request to that model
# fails) and stops the server when it cannot; SIGTERM stops tritonserver cleanly (it waits
# $WFF_EXIT_TIMEOUT_S for requests in flight, so give the container a longer stop grace period).
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
# (BENCHMARKS.md, soak). auto (jemalloc where installed, else glibc with a warning) | jemalloc |
# glibc | a library path. The Python-backend stubs keep glibc (wff serve gives them a stub
# wrapper that clears LD_PRELOAD).
SERVER_MALLOC="${WFF_SERVER_MALLOC:-auto}"
TRITONSERVER="${WFF_TRITONSERVER:-tritonserver}"      # a path, or a name on PATH
TRITON_BACKENDS="${WFF_TRITON_BACKENDS:-/opt/tritonserver/backends}"
EXIT_TIMEOUT_S="${WFF_EXIT_TIMEOUT_S:-30}"            # tritonserver's wait for requests in flight on SIGTERM
STARTUP_TIMEOUT_S="${WFF_STARTUP_TIMEOUT_S:-600}"     # model loading, plans included
# Inside the container every endpoint listens on all interfaces; which of them the host or the
# cluster exposes is decided where the ports are published (compose, Service, NetworkPolicy).
GRPC_ADDRESS="${WFF_GRPC_ADDRESS:-0.0.0.0}"
HTTP_ADDRESS="${WFF_HTTP_ADDRESS:-0.0.0.0}"
METRICS_ADDRESS="${WFF_METRICS_ADDRESS:-0.0.0.0}"
GRPC_PORT="${WFF_GRPC_PORT:-8001}"
HTTP_PORT="${WFF_HTTP_PORT:-8000}"
METRICS_PORT="${WFF_METRICS_PORT:-8002}"
# gRPC TLS: server certificate and key (PEM), and a CA for mutual TLS (clients must present a
# certificate it signed). Empty: plain gRPC.
TLS_CERT="${WFF_TLS_CERT:-}"
TLS_KEY="${WFF_TLS_KEY:-}"
TLS_CLIENT_CA="${WFF_TLS_CLIENT_CA:-}"

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

serve() {
    prepare
    # wff serve's own files (the backend directory with the stub wrapper) go to /tmp, a tmpfs (compose) or
    # an emptyDir (Kubernetes), so the image's root filesystem stays read-only and nothing piles up in the state
    export TMPDIR="${TMPDIR:-/tmp}"
    mkdir -p "$TMPDIR"
    local gpu_metrics=true tls=()
    [[ "$INSTANCE_KIND" == KIND_CPU ]] && gpu_metrics=false
    [[ -n "$TLS_CERT" ]] && tls+=(--tls-cert "$TLS_CERT")
    [[ -n "$TLS_KEY" ]] && tls+=(--tls-key "$TLS_KEY")
    [[ -n "$TLS_CLIENT_CA" ]] && tls+=(--tls-client-ca "$TLS_CLIENT_CA")
    log "starting $TRITONSERVER on $REPOSITORY under wff serve (HTTP $HTTP_PORT, gRPC $GRPC_PORT, metrics $METRICS_PORT)"
    exec wff -v serve \
        --repository "$REPOSITORY" \
        --tritonserver "$TRITONSERVER" --backend-directory "$TRITON_BACKENDS" \
        --grpc-address "$GRPC_ADDRESS" --grpc-port "$GRPC_PORT" \
        --http-address "$HTTP_ADDRESS" --http-port "$HTTP_PORT" \
        --metrics-address "$METRICS_ADDRESS" --metrics-port "$METRICS_PORT" \
        "${tls[@]}" \
        --shm-default-bytes "$SHM_DEFAULT_BYTES" --shm-growth-bytes "$SHM_GROWTH_BYTES" \
        --server-malloc "$SERVER_MALLOC" \
        --exit-timeout "$EXIT_TIMEOUT_S" --startup-timeout "$STARTUP_TIMEOUT_S" \
        --log-verbose "$LOG_VERBOSE" --log-file - \
        -- --allow-gpu-metrics="$gpu_metrics" "$@"
}

case "${1:-serve}" in
    prepare) prepare ;;
    serve) shift || true; serve "$@" ;;
    *) exec "$@" ;;
esac
