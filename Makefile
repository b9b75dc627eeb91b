# One venv for everything; `make test` and `make demo` install what they need first.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test demo bench wheels clean

setup: $(STAMP)

# torch first from the local CPU wheel, so transformers does not pull a CUDA build;
# the reference package goes in with --no-deps (its pins would replace torch): tests load its model module only.
# libfluidsynth3 (Debian) renders SoundFont presets for the data job; installed once, as root.
$(STAMP): setup.py pyproject.toml
	dpkg -s libfluidsynth3 >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq libfluidsynth3)
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[all]'
	$(BIN)/pip install -q --no-deps tokensynth==0.0.4 appdirs
	# descript's DAC for tests/test_dac_parity.py: its audiotools dependency pulls torchaudio, so --no-deps (model code needs einops only)
	$(BIN)/pip install -q --no-deps descript-audio-codec==1.0.0 einops
	# LAION's CLAP for tests/test_clap_parity.py: its pins pull numpy<2, wandb, webdataset, so --no-deps; its model code needs these (torchvision is stood in by the test)
	$(BIN)/pip install -q --no-deps laion-clap==1.1.7 torchlibrosa==0.1.0 h5py ftfy wcwidth
	# basic-pitch only for tests/test_basic_pitch_vendored.py, which checks our vendored copy (evaluation/basic_pitch/) against it; the package never imports it.
	# Its Linux requirements pin TensorFlow and numpy 1.x, so --no-deps; its modules import resampy (>= 0.4.3: 0.4.2, its pin, imports pkg_resources, gone from setuptools >= 81)
	$(BIN)/pip install -q --no-deps basic-pitch==0.4.0 'resampy>=0.4.3'
	touch $(STAMP)

# libtpu, the TPU compiler, apart from the venv (on its path every JAX process would start it): for
# `tokensynth compile-step --topology` in tests/test_compile_step.py. The version jax[tpu] pins.
LIBTPU := $(VENV)/libtpu
$(LIBTPU)/.installed: $(STAMP)
	$(BIN)/pip install -q --no-deps --upgrade --target $(LIBTPU) "$$($(BIN)/python -c 'import importlib.metadata as m; print(next(r.split(";")[0].strip() for r in m.requires("jax") if r.startswith("libtpu")))')"
	touch $@

# pytest-xdist: two workers (CI has 2 cores; TEST_WORKERS=N for more), the slow tests first (conftest.py).
TEST_WORKERS ?= 2
test: setup $(LIBTPU)/.installed
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist load tests

demo: setup
	$(BIN)/tokensynth demo

bench: setup
	$(BIN)/python benchmarks/generation.py
	$(BIN)/python benchmarks/prep.py

# What benchmarks/accelerator.py needs on a bare GPU machine (jax, flax, optax, torch and
# transformers already there) as Python 3.12 manylinux wheels, carried to it in wheels/. On the
# machine: pip install --no-deps wheels/*.whl && python benchmarks/accelerator.py --out accel
GPU_WHEELS := grain array_record pretty_midi mido six ml_collections importlib_resources appdirs tokensynth==0.0.4
# Any pip will do (PIP=pip3); the venv's is the default.
PIP ?= $(BIN)/pip
wheels:
	$(PIP) download -q --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 --no-deps -d wheels $(GPU_WHEELS)

clean:
	rm -rf $(VENV) .pytest_cache
