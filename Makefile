# m6-engine: `make install | test | test-all | bench | gpu-check`. Each target installs what it needs first.
# Idempotent: stamps in .stamps/ record what was done; a second `make install` does nothing costly.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMPS := .stamps
CSRC := $(shell find csrc -type f \( -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' \) 2>/dev/null)
# The toolkit torch would otherwise guess wrong (setup.py explains); a user's CUDA_HOME wins.
export CUDA_HOME ?= $(if $(wildcard /usr/local/cuda/bin/nvcc),/usr/local/cuda,)
export MAX_JOBS ?= 2
PYTEST_ARGS ?=

.PHONY: install demo test test-all test-torch211 bench gpu-check clean

install: $(STAMPS)/ext m6_engine/_data/vocab.txt

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMPS)/deps: requirements.txt | $(PY)
	$(PY) -m pip install --quiet -r requirements.txt
	@mkdir -p $(STAMPS) && touch $@

# m6_engine._C is built in place, ahead of time (ninja, incremental in build/: never a JIT at
# import); a .pth file puts this checkout on the venv's path, as an editable install would.
$(STAMPS)/ext: $(STAMPS)/deps setup.py build_support.py $(CSRC)
	$(PY) setup.py --quiet build_ext --inplace
	$(PY) -c "import site, os; open(os.path.join(site.getsitepackages()[0], 'm6_engine_checkout.pth'), 'w').write(os.getcwd() + '\\n')"
	$(PY) -c "import m6_engine.ops as o; o.require_extension(); print('m6_engine._C:', 'cuda+cpu' if o.cuda_kernels_built() else 'cpu', 'kernels, cpu capability', o.cpu_capability())"
	@mkdir -p $(STAMPS) && touch $@

# The default vocab (bert-base-chinese, 21128 entries) is not committed: fetched from a PyPI wheel
# and md5-checked (m6_engine/data/vocab_fetch.py says why and how).
m6_engine/_data/vocab.txt: | $(STAMPS)/deps
	$(PY) -m m6_engine.data.vocab_fetch --dest $@

# The main job on an embedded default: data, 4-rank pretraining (tp=2, pp=2) on CPU, held-out
# captions. DEMO_STEPS, DEMO_IMAGES, DEMO_MAX_SHAPES, DEMO_EVAL_LIMIT shorten or lengthen it.
DEMO_OUT ?= runs/demo
demo: install
	$(PY) examples/demo.py --out $(DEMO_OUT)

# `make test` leaves out the tests marked slow (long multi-rank parity cases; tests/conftest.py),
# so it stays within ~12 minutes on two cores; `make test-all` runs every test.
test: install
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS) tests

test-all: install
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

# The second CI leg: the oldest supported torch (2.11.0, CPU), in its own venv and with its own
# CPU-only build of the extension in .torch211/lib (M6_EXTENSION_DIR points m6_engine.ops at it), so
# the main leg's in-place m6_engine/_C*.so and _C.cpu_flags are never touched. Only what the
# selected tests import is installed (same pins as requirements.txt; no torchvision, transformers
# or megatron-core). The tests: the ops (with the attention's torch backends: the GPU image has
# torch 2.11), one multi-rank ZeRO-1 + dp-bucket parity run, the checkpoint round trips and
# asynchronous checkpoints (their digests hook DCP's FileSystemWriter, whose internals move), the
# collectives and torch-version checks, the CPU AdamW op with ZeRO-Offload and sequence parallelism
# and the per-shard initialisation (as a GPU image's torch runs them), the gpu-check dry run.
VENV211 := .venv-torch211
PY211 := $(VENV211)/bin/python
BUILD211 := .torch211
# torch 2.11.0 requires setuptools<82: 81.0.0 instead of requirements.txt's 84.2.1.
TORCH211_PINS := numpy ninja pybind11 regex tensorboard pyyaml tqdm pytest pytest-timeout packaging
TORCH211_TESTS := tests/test_masked_softmax.py tests/test_layer_norm.py tests/test_attention.py \
	tests/test_attention_torch.py \
	tests/test_training.py::test_zero1_matches_unsharded tests/test_checkpoint.py \
	tests/test_async_checkpoint.py \
	tests/test_collectives.py tests/test_torch_version.py \
	tests/test_cpu_adamw.py tests/test_offload.py tests/test_sequence_parallel.py \
	tests/test_normal_shard.py tests/test_init_layout.py \
	tests/test_gpu_check.py::test_dry_run_runs_every_step_and_stage

$(PY211):
	$(PYTHON) -m venv $(VENV211)
	$(PY211) -m pip install --quiet --upgrade pip

$(STAMPS)/deps-torch211: requirements.txt | $(PY211)
	$(PY211) -m pip install --quiet torch==2.11.0 setuptools==81.0.0 $$(grep -E '^($(shell echo $(TORCH211_PINS) | tr ' ' '|'))==' requirements.txt)
	@mkdir -p $(STAMPS) && touch $@

$(STAMPS)/ext-torch211: $(STAMPS)/deps-torch211 setup.py build_support.py $(CSRC)
	M6_BUILD_CUDA=0 $(PY211) setup.py --quiet build_ext --build-lib $(BUILD211)/lib --build-temp $(BUILD211)/temp
	M6_EXTENSION_DIR=$(BUILD211)/lib/m6_engine $(PY211) -c "import m6_engine.ops as o; o.require_extension(); print('m6_engine._C (torch 2.11):', o.cpu_capability())"
	@mkdir -p $(STAMPS) && touch $@

# The vocabulary (test_training's corpus) as `make install` fetches it, but with this leg's venv:
# `make test-torch211` alone never builds the main .venv.
test-torch211: $(STAMPS)/ext-torch211
	[ -f m6_engine/_data/vocab.txt ] || $(PY211) -m m6_engine.data.vocab_fetch --dest m6_engine/_data/vocab.txt
	M6_EXTENSION_DIR=$(BUILD211)/lib/m6_engine PYTHONPATH=$(CURDIR) $(PY211) -m pytest -q $(PYTEST_ARGS) $(TORCH211_TESTS)

bench: install
	$(PY) -m tests.bench.run_all --out bench-results

gpu-check:
	bash tests/gpu_check.sh

clean:
	rm -rf build $(BUILD211) $(STAMPS) m6_engine/_C*.so m6_engine/_C.cpu_flags *.egg-info
