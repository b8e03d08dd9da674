# frcnn: every command a user needs. `make install` first; everything else runs from .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
MODEL ?= checkpoints/demo-tiny-shapes
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install test serve bench bench-server lint demo-model golden refvenv docker docker-gpu k8s-render image image-check clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt setup.py runtime/_jpegbands.c
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools wheel
	$(PIP) install -c constraints.txt -e '.[all]'
	touch $@

# One test process per core (at most 4); tests that share a session export run in one of them
# (tests/conftest.py, SHARED_EXPORTS). `$(PY) -m pytest` alone runs the same suite in one process.
test: install
	$(PY) -m pytest -q -n auto --maxprocesses 4 --dist loadgroup

# A checkpoint directory is exported to ONNX first (only when the cached graph is missing or stale:
# its metadata records the checkpoint's digest), then served by onnxruntime; a file is served as is.
# MODEL=coco-r50 or coco-mnv3: torchvision's published COCO weights, downloaded with their sha256
# (WEIGHTS_URL= fetches the same file from a mirror or file://), converted to a checkpoint under
# $(SERVE_CACHE), then exported and served like any checkpoint. See model/published.py.
SERVE_CACHE ?= .cache/serve
PUBLISHED_MODELS := coco-r50 coco-mnv3
SERVE_CKPT := $(if $(filter $(MODEL),$(PUBLISHED_MODELS)),$(SERVE_CACHE)/$(MODEL),$(MODEL))
ifeq ($(suffix $(MODEL)),)
SERVE_MODEL := $(SERVE_CACHE)/$(notdir $(MODEL)).onnx
else
SERVE_MODEL := $(MODEL)
endif

serve: install
ifneq ($(filter $(MODEL),$(PUBLISHED_MODELS)),)
	$(PY) -m model fetch $(MODEL) --out $(SERVE_CKPT) $(if $(WEIGHTS_URL),--url $(WEIGHTS_URL)) $(if $(WEIGHTS_SHA256),--sha256 $(WEIGHTS_SHA256))
endif
ifeq ($(suffix $(MODEL)),)
	$(PY) -m export onnx --checkpoint $(SERVE_CKPT) --out $(SERVE_MODEL) --if-stale
endif
	$(PY) -m server --model $(SERVE_MODEL) --host $(HOST) --port $(PORT)

bench: install
	$(PY) -m benchmarks.core

# R50-FPN (converted torchvision, stand-in weights) on onnxruntime: same-size and mixed-size streams
# at concurrency 1/4/16; then the per-request overhead (demo model) and the costly-decode check.
bench-server: install
	$(PY) -m benchmarks.server_load --r50-parity --max-batch-size 4 --duration 30
	$(PY) -m benchmarks.overhead
	$(PY) -m benchmarks.hostile_decode

lint: install
	$(PY) -m ruff check .
	$(VENV)/bin/hadolint deploy/Dockerfile deploy/Dockerfile.gpu
	$(VENV)/bin/shellcheck --shell=sh deploy/gpu-entrypoint.sh

demo-model: install
	$(PY) -m train --data synthetic-shapes --preset tiny --out runs/demo-tiny-shapes --seed 0
	rm -rf $(MODEL) && mkdir -p $(MODEL)
	cp runs/demo-tiny-shapes/best/model.safetensors runs/demo-tiny-shapes/best/model.json $(MODEL)/

# Reference venv with torchvision (CUDA build, runs on CPU): only for golden fixtures and side-by-side benchmarks.
refvenv: .refvenv/.installed

.refvenv/.installed:
	$(PYTHON) -m venv .refvenv
	PIP_FIND_LINKS= PIP_CONFIG_FILE=/dev/null .refvenv/bin/pip install torch==2.13.0 torchvision==0.28.0 safetensors numpy pillow
	touch $@

COCO := ../shared/data/coco128/train2017
GOLDEN_IMAGES := $(addprefix $(COCO)/,000000000009.jpg 000000000036.jpg 000000000049.jpg 000000000078.jpg)
golden: install refvenv
	.refvenv/bin/python tools/make_golden_ops.py
	mkdir -p .cache
	$(PY) tools/parity_weights.py --arch resnet50_fpn --out .cache/r50_parity.pth
	.refvenv/bin/python tools/make_golden_model.py --arch resnet50_fpn --weights .cache/r50_parity.pth \
		--out tests/fixtures/tv_r50_golden.safetensors $(GOLDEN_IMAGES)
	$(PY) tools/parity_weights.py --arch mobilenet_v3_large_fpn --out .cache/mnv3_parity.pth
	.refvenv/bin/python tools/make_golden_model.py --arch mobilenet_v3_large_fpn --weights .cache/mnv3_parity.pth \
		--out tests/fixtures/tv_mnv3_golden.safetensors $(GOLDEN_IMAGES)

IMAGE ?= frcnn
TAG ?= latest

# Images bake the model $(MODEL) (a directory under checkpoints/). Needs a Docker engine with BuildKit.
docker:
	@test -f $(MODEL)/model.safetensors || { echo "$(MODEL) missing: run 'make demo-model' first"; exit 1; }
	docker build -f deploy/Dockerfile --build-arg MODEL_NAME=$(notdir $(MODEL)) -t $(IMAGE):$(TAG) .

docker-gpu:
	@test -f $(MODEL)/model.safetensors || { echo "$(MODEL) missing: run 'make demo-model' first"; exit 1; }
	docker build -f deploy/Dockerfile.gpu --build-arg MODEL_NAME=$(notdir $(MODEL)) -t $(IMAGE)-gpu:$(TAG) .

# Kubernetes manifests (base + overlays) as plain YAML in out/k8s/: kustomize/kubectl when present,
# else tools/k8s_render.py's built-in renderer (tests check both agree). No cluster needed.
k8s-render: install
	$(PY) tools/k8s_render.py --all --out-dir out/k8s

# The CPU image with Docker (BuildKit) or, where no Docker engine answers, podman. Options for the
# build go in IMAGE_BUILD_ARGS (the Dockerfile's header lists its build arguments).
IMAGE_BUILD_ARGS ?=
image:
	@test -f $(MODEL)/model.safetensors || { echo "$(MODEL) missing: run 'make demo-model' first"; exit 1; }
	@if docker info >/dev/null 2>&1; then set -x; \
		docker build -f deploy/Dockerfile --build-arg MODEL_NAME=$(notdir $(MODEL)) $(IMAGE_BUILD_ARGS) -t $(IMAGE):$(TAG) .; \
	elif command -v podman >/dev/null; then set -x; \
		podman build --format docker -f deploy/Dockerfile --ignorefile deploy/Dockerfile.dockerignore \
			--build-arg MODEL_NAME=$(notdir $(MODEL)) $(IMAGE_BUILD_ARGS) -t $(IMAGE):$(TAG) .; \
	else echo "make image: needs docker (with a running engine) or podman"; exit 1; fi

# Builds the image here with podman (base image made from Debian's packages, the local torch wheel)
# and serves from it as a pod would: read-only root, the k8s volumes, the image's user, env and
# HEALTHCHECK; /detect answers compared with the checkout's server. Needs root, podman, debootstrap.
IMAGE_CACHE ?= .cache/image
image-check: install
	$(PY) tools/image_check.py --image localhost/$(IMAGE):check --model $(MODEL) --cache $(IMAGE_CACHE)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build runtime/_jpegbands*.so
