# frcnn: every command a user needs. `make install` first; everything else runs from .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
MODEL ?= checkpoints/demo-tiny-shapes
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install test test-fast serve bench bench-server lint demo-model golden refvenv docker k8s-render clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools wheel
	$(PIP) install -c constraints.txt -e '.[all]'
	touch $@

test: install
	$(PY) -m pytest -q

serve: install
	$(PY) -m server --host $(HOST) --port $(PORT)

bench: install
	$(PY) -m benchmarks.core

bench-server: install
	$(PY) -m benchmarks.server_load

lint: install
	$(PY) -m ruff check .

demo-model: install
	$(PY) -m train --data synthetic-shapes --preset tiny --out runs/demo-tiny-shapes --seed 0
	$(PY) -m model export-weights runs/demo-tiny-shapes/best --out $(MODEL)

# Reference venv with torchvision (CUDA build, runs on CPU): only for golden fixtures and side-by-side benchmarks.
refvenv: .refvenv/.installed

.refvenv/.installed:
	$(PYTHON) -m venv .refvenv
	PIP_FIND_LINKS= PIP_CONFIG_FILE=/dev/null .refvenv/bin/pip install torch==2.13.0 torchvision==0.28.0 safetensors numpy pillow
	touch $@

golden: refvenv
	.refvenv/bin/python tools/make_golden.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
