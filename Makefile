# The two README commands: `make demo` (main job on the embedded sample data) and `make test`.
# Both create .venv and install everything on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)

.PHONY: install demo test lint format bench gpu-wheels clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned to the build these machines carry on local disk (no multi-GB download)
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q -e ".[dev]"
	# tests/test_graphseg.py checks DRFI's segmentation against cv2.ximgproc, which is in the
	# opencv-contrib build only; it shares the cv2 folder with the plain wheel pysodmetrics
	# requires, so replace the plain one (same cv2 API, plus ximgproc). The runtime needs neither.
	$(BIN)/python -c "import cv2; cv2.ximgproc.segmentation" 2>/dev/null || { \
	  $(BIN)/python -m pip uninstall -y -q opencv-python-headless opencv-python opencv-contrib-python-headless; \
	  $(BIN)/python -m pip install -q --no-deps opencv-contrib-python-headless; }
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

# The main job, pipelines/demo.yaml: DRFI masks + report on the sample source, a held-out
# labelled set, a short HARL run, k-NN and a linear probe. Re-running skips finished stages.
demo: $(STAMP)
	$(BIN)/maskgen pipeline pipelines/demo.yaml
	$(BIN)/sslmask inspect out/demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q --durations=15

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(STAMP)
	$(BIN)/python benchmarks/build_throughput.py
	$(BIN)/python benchmarks/loader_throughput.py
	$(BIN)/python benchmarks/train_step.py

# What benchmarks/gpu_check.py needs on the GPU machine (Python 3.12, no network) besides what it
# has: pure wheels plus pycocotools, scikit-learn (py_sod_metrics imports it) and numba (DRFI's loops,
# imported with every method) for CPython 3.12.
# There: pip install --no-index --no-deps .gpu-wheels/*.whl && python benchmarks/gpu_check.py
gpu-wheels: $(STAMP)
	$(BIN)/python -m pip download -q --only-binary=:all: --no-deps --python-version 3.12 \
	  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
	  -d .gpu-wheels pysodmetrics webdataset braceexpand pycocotools threadpoolctl scikit-learn joblib faiss-cpu \
	  numba llvmlite

clean:
	rm -rf out .pytest_cache
