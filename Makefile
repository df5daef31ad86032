# care-jax: `make demo` sets up and runs the quickstart end to end; `make test` the suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup data test demo bench gpu-wheels gpu-data gpu-carry gpu-aot clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements-core.txt requirements-lock.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -c requirements-lock.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	@touch $@

# The embedded default data: Debian's Fashion-MNIST IDX files. Skipped (with a
# note) where there is no apt-get; the loader then says how to provide the data.
data:
	@if [ -f $(FMNIST) ]; then :; \
	elif command -v apt-get >/dev/null; then \
	  $(SUDO) apt-get install -y -q dataset-fashion-mnist >/dev/null || \
	  { $(SUDO) apt-get update -q >/dev/null && $(SUDO) apt-get install -y -q dataset-fashion-mnist >/dev/null; }; \
	else echo "note: no apt-get; Fashion-MNIST tests will be skipped"; fi

# Two pytest workers: compiling, most of the suite's time, runs on one core.
TEST_WORKERS ?= 2
test: $(STAMP) data
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal tests

# The main job: pretrain the quickstart model on Fashion-MNIST, evaluate it
# (kNN, linear probe, Wahba / gamma_f) and write runs/quickstart/report.json and
# PNG plots. Rerunning resumes from the last checkpoint (a finished run prints its
# report's line); `make clean` starts over.
demo: $(STAMP) data
	$(PY) -m care_jax.main --config=configs/quickstart.py --workdir=runs/quickstart

bench: $(STAMP)
	$(PY) -m pip install -q -r requirements-bench.txt
	$(PY) -m experiments.bench_losses

# Pure-Python wheels the GPU machine lacks (it has jax, flax, optax, orbax, chex and
# torch, no TensorFlow or ml_collections): carried as .whl/ (README, "On a GPU").
gpu-wheels:
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
	  --implementation cp --platform manylinux2014_x86_64 -d .whl ml_collections==1.1.0

# The embedded default data for the GPU machine's end-to-end run (30 MB of the
# 64 MiB a device call carries): carried as .gpu_data/, read as --config.data_dir.
gpu-data: data
	mkdir -p .gpu_data
	cp $(dir $(FMNIST))*-idx?-ubyte.gz .gpu_data/

# Everything experiments/gpu_figures.sh needs there: carry=[".whl", ".gpu_data"].
gpu-carry: gpu-wheels gpu-data

# Static profile of the train step compiled ahead of time for an H200 (or
# GPU_AOT_ARGS="--target h100"), on this CPU host: jax's CUDA compiler plugin of
# the locked jax version goes into .aot_site/, outside the venv (README, "On a GPU").
JAX_VERSION = $(shell sed -n 's/^jax==//p' requirements-lock.txt)
GPU_AOT_ARGS ?=
gpu-aot: $(STAMP)
	@test -d .aot_site/jax_plugins || $(PY) -m pip install -q --no-deps --only-binary=:all: \
	  --python-version $$($(PY) -c 'import sys; print("%d.%d" % sys.version_info[:2])') \
	  --platform manylinux_2_27_x86_64 --target .aot_site \
	  jax-cuda12-plugin==$(JAX_VERSION) jax-cuda12-pjrt==$(JAX_VERSION)
	JAX_PLATFORMS=cpu PYTHONPATH=.aot_site:. $(PY) -m experiments.gpu_aot_profile $(GPU_AOT_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
