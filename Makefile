# q4conv: `make demo` runs the main job, `make test` runs every test.
# Both create the virtual environment and install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.11.0
CUTLASS_VERSION ?= 4.2.0.0
# CUDA architectures of the kernels (90a = Hopper wgmma path).
Q4CONV_CUDA_ARCHS ?= 80;86;89;90a
export Q4CONV_CUDA_ARCHS
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(shell nproc)

.PHONY: demo test install deps cpp-test py-test bench clean

$(VENV)/.deps-stamp:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION) numpy pytest expecttest hypothesis \
		scikit-build-core ninja scikit-learn matplotlib tqdm
	# CUTLASS headers only: its Python dependencies are not needed to build.
	$(PY) -m pip install -q --no-deps nvidia-cutlass==$(CUTLASS_VERSION)
	touch $@

deps: $(VENV)/.deps-stamp

# Builds the extension (CPU ops, and the CUDA kernels when nvcc is present).
install: deps
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pip install -q --no-build-isolation .

cpp-test: deps
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" cmake -S tests/cpp -B build/cpptest -G Ninja -DCMAKE_BUILD_TYPE=Release
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" cmake --build build/cpptest
	ctest --test-dir build/cpptest --output-on-failure

py-test: install
	$(PY) -m pytest -q tests/python

test: cpp-test py-test

demo: install
	$(PY) examples/demo.py

bench: install
	$(PY) bench/bench.py

clean:
	rm -rf build demo_out
