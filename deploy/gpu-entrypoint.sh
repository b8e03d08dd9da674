#!/bin/sh
# Entrypoint of deploy/Dockerfile.gpu: make sure a TensorRT engine for FRCNN_MODEL exists for THIS
# GPU and TensorRT version (engines are not portable across either), then run the command (the
# image's CMD, `python -m server`) with FRCNN_MODEL pointing at the engine.
#
# The engine is built once and cached in EXPORT_CACHE_DIR/engines, keyed by model content, GPU
# model and TensorRT version; mount a volume there so restarts skip the build. Replicas sharing
# the volume never read a half-written engine (build beside it, then rename).
# Precision is the exported graph's (TensorRT builds it strongly typed: no precision flags):
#   ENGINE_PRECISION=fp16 (default) | fp32 | int8: with a checkpoint, `export onnx --precision` it
#                (int8 needs CALIB_IMAGES, a directory of real images to calibrate on, and is gated
#                on others there); with an .onnx file, the graph's own precision is used as it is
#   FRCNN_MODEL: a checkpoint directory or an .onnx file (built into an engine here), or an
#                .engine file (served as it is: you vouch that it matches the GPU)
set -eu

model="${FRCNN_MODEL:?set FRCNN_MODEL to a checkpoint directory, an .onnx or an .engine file}"
case "$model" in
    *.engine | *.plan) exec "$@" ;;
esac

cache="${EXPORT_CACHE_DIR:-/var/cache/frcnn}/engines"
mkdir -p "$cache"
precision="${ENGINE_PRECISION:-fp16}"
calib_flags=""
case "$precision" in
    fp16 | fp32) ;;
    int8)
        if [ -d "$model" ] && [ ! -d "${CALIB_IMAGES:-}" ]; then
            echo "gpu-entrypoint: ENGINE_PRECISION=int8 needs CALIB_IMAGES (a directory of real images)" >&2
            exit 2
        fi
        calib_flags="--calib-images ${CALIB_IMAGES:-}" ;;
    *) echo "gpu-entrypoint: ENGINE_PRECISION must be fp16, fp32 or int8, not '$precision'" >&2; exit 2 ;;
esac
if [ ! -d "$model" ]; then  # an exported graph: its metadata says what it computes in
    precision=$(python -c 'import sys, onnx
from export.precision import precision_of
print(precision_of(onnx.load(sys.argv[1], load_external_data=False)))' "$model")
fi

# The engine's batch profile must cover the server's batches: read max_batch_size from the server's
# own settings (environment, .env, defaults), not from a second copy of the default here.
info=$(python -c 'import tensorrt, torch
from server.settings import Settings
p = torch.cuda.get_device_properties(0)
target = f"{p.name}-sm{p.major}{p.minor}-trt{tensorrt.__version__}".replace(" ", "_")
print(target, Settings().max_batch_size)')
target=${info% *}
max_batch=${info##* }
if [ -d "$model" ]; then
    digest=$(cat "$model"/model.json "$model"/model.safetensors | sha256sum | cut -c1-16)
else
    digest=$(sha256sum "$model" | cut -c1-16)
fi
name=$(basename "$model" .onnx)
engine="$cache/$name-$digest-$target-b$max_batch-$precision.engine"

if [ ! -s "$engine" ]; then
    tmp=$(mktemp -d "$cache/.build-XXXXXX")
    trap 'rm -rf "$tmp"' EXIT
    echo "gpu-entrypoint: building $engine (first start on this GPU; takes minutes)" >&2
    if [ -d "$model" ]; then
        # shellcheck disable=SC2086  # empty calibration flags must vanish, not become ""
        python -m export onnx --checkpoint "$model" --out "$tmp/model.onnx" --precision "$precision" $calib_flags
        onnx="$tmp/model.onnx"
    else
        onnx="$model"
    fi
    python -m export tensorrt --model "$onnx" --out "$tmp/model.engine" \
        --opt-batch "$max_batch" --max-batch "$max_batch"
    # the sidecar (graph contract, profile) first: a reader that sees the engine finds it too
    mv "$tmp/model.json" "${engine%.engine}.json"
    mv "$tmp/model.engine" "$engine"
    rm -rf "$tmp"
    trap - EXIT
fi

FRCNN_MODEL="$engine"
FRCNN_BACKEND=tensorrt
export FRCNN_MODEL FRCNN_BACKEND
exec "$@"
