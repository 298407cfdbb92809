# The README's two commands: `make run` (the main job: the digits comparisons, then the
# expressiveness benchmark's rank-limited task) and `make test` (the test suite).
# Each creates .venv and installs what it needs on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_SPEC ?= torch==2.14.1
# nvcc for the CUDA extension, which `make test` compiles once in tests/backends/test_cuda_build.py
# (ninja, cached in ~/.cache/lorasc_kernels), not again during pip install.
CUDA_HOME ?= $(wildcard /usr/local/cuda)
# The CUTLASS C++ headers of the CUDA extension's sm90a GEMMs (the wheel's
# cutlass_library/source/include); only the headers are used, so without its Python deps.
# The same pin as lorasc_kernels/_build.py's CUTLASS_PACKAGE and pyproject's `cuda` extra.
CUTLASS_SPEC ?= nvidia-cutlass==4.2.0.0

.PHONY: venv install-run install-test run test bench lint style clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

venv: $(PY)

install-run: venv
	$(PIP) install -q "$(TORCH_SPEC)" setuptools wheel
	LORASC_SKIP_CUDA_BUILD=1 $(PIP) install -q --no-build-isolation -e ".[examples]"

install-test: venv
	$(PIP) install -q "$(TORCH_SPEC)" triton setuptools wheel
	$(PIP) install -q --no-deps "$(CUTLASS_SPEC)"
	LORASC_SKIP_CUDA_BUILD=1 $(PIP) install -q --no-build-isolation -e ".[test,dev]"

run: install-run
	$(PY) examples/finetune_digits.py
	$(PY) -m benchmarks --only expressiveness --threads 1 --out examples/out

test: install-test
	CUDA_HOME="$(CUDA_HOME)" MAX_JOBS="$${MAX_JOBS:-2}" $(PY) -m pytest -q tests

bench: install-test
	$(PY) -m benchmarks --quick

# Style, enforced in CI before the tests (.ci/run): ruff's lint rules and its formatter, the
# same checks as .pre-commit-config.yaml. LINT_PATHS: what is checked.
LINT_PATHS ?= lorasc_kernels tests benchmarks examples setup.py

lint: install-test
	$(MAKE) --no-print-directory style

style:
	$(PY) -m ruff check $(LINT_PATHS)
	$(PY) -m ruff format --check $(LINT_PATHS)

clean:
	rm -rf $(VENV) build *.egg-info
