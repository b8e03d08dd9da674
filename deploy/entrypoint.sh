#!/bin/sh
# Entrypoint of deploy/Dockerfile: serve FRCNN_MODEL's ONNX export, then run the command (the
# image's CMD, `python -m server`) with FRCNN_MODEL pointing at that .onnx file.
#
# The baked model was exported when the image was built (`frcnn-entrypoint bake`, below): when
# FRCNN_MODEL is that checkpoint (same files, e.g. the copy Kubernetes' init container makes) the
# baked .onnx is served and nothing is written. Any other checkpoint directory is exported on start
# into EXPORT_CACHE_DIR/model.onnx, a writable volume (the root filesystem may be read-only).
#   FRCNN_MODEL: a checkpoint directory (exported as above) or an .onnx file (served as it is)
#
#   frcnn-entrypoint bake CHECKPOINT_DIR OUT_DIR     build time: OUT_DIR/<name>.onnx + <name>.sha256
set -eu

# where `bake` put the image's own export (a variable only so that tests can point elsewhere)
baked_dir="${BAKED_ONNX_DIR:-/opt/frcnn/onnx}"

# sha256 of the checkpoint's files: what decides whether an export still matches its checkpoint
digest() {
    cat "$1"/model.json "$1"/model.safetensors | sha256sum | cut -d' ' -f1
}

if [ "${1:-}" = bake ]; then
    ckpt=$2 out=$3
    name=$(basename "$ckpt")
    mkdir -p "$out"
    python -m export onnx --checkpoint "$ckpt" --out "$out/$name.onnx"
    digest "$ckpt" > "$out/$name.sha256"
    # the server's user reads the graph, whatever the build's umask
    chmod -R a+rX "$out"
    exit 0
fi

# numba's kernels as the image's build compiled them, where numba may write (it refuses a read-only
# cache); without them it compiles on first use
baked_numba="${BAKED_NUMBA_CACHE:-/opt/frcnn/numba-cache}"
if [ -n "${NUMBA_CACHE_DIR:-}" ] && [ -d "$baked_numba" ] && [ ! -e "$NUMBA_CACHE_DIR" ]; then
    cp -R "$baked_numba" "$NUMBA_CACHE_DIR" 2>/dev/null || echo "frcnn-entrypoint: numba cache not copied" >&2
fi

model="${FRCNN_MODEL:?set FRCNN_MODEL to a checkpoint directory or an .onnx file}"
if [ -d "$model" ]; then
    baked="$baked_dir/$(basename "$model")"
    if [ -f "$baked.onnx" ] && [ "$(cat "$baked.sha256" 2>/dev/null)" = "$(digest "$model")" ]; then
        echo "frcnn-entrypoint: serving $baked.onnx, exported from this checkpoint at build time" >&2
        FRCNN_MODEL="$baked.onnx"
    else
        cache="${EXPORT_CACHE_DIR:-/var/cache/frcnn}"
        mkdir -p "$cache"
        echo "frcnn-entrypoint: $model is not the baked model; exporting it to $cache/model.onnx" >&2
        # --if-stale: a volume that kept an export of this same checkpoint is not exported again
        python -m export onnx --checkpoint "$model" --out "$cache/model.onnx" --if-stale
        FRCNN_MODEL="$cache/model.onnx"
    fi
    export FRCNN_MODEL
fi
exec "$@"
