# tur_ext: the two commands are `make demo` and `make test`; everything else is for developers.
SHELL := /bin/bash
VENV ?= .venv
PY ?= python3
PYTHON := $(VENV)/bin/python
# A system torch (a GPU box's CUDA build) is visible inside the venv, so it is used rather than replaced.
VENV_FLAGS ?= --system-site-packages
DEPS := numpy opencv-python-headless pybind11 ninja pytest pytest-benchmark PyYAML tqdm matplotlib \
        scikit-image tensorboard 'setuptools>=77' wheel \
        safetensors onnx onnxscript onnxruntime
CSRC := $(shell find csrc -type f)
APT_PACKAGES := libopencv-core-dev libopencv-imgproc-dev libopencv-imgcodecs-dev chromium
NVCC ?= nvcc
CUDA_ARCHS ?= 80 90

.PHONY: setup test bench cuda-check cuda-emu demo cpp-test runner study clean slow-export-check

setup: $(VENV)/.installed

$(VENV)/.installed: setup.py pyproject.toml $(CSRC)
	test -x $(PYTHON) || $(PY) -m venv $(VENV_FLAGS) $(VENV)
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -q $(DEPS)
	# --no-build-isolation: compile against the torch installed above instead of downloading another one.
	$(PYTHON) -m pip install -q --no-build-isolation --no-deps -e .
	# spandrel, a test-only tool (tests/test_safetensors_export.py), in its own folder with --no-deps: its declared
	# dependencies would pull a CUDA torch and torchvision. einops only for spandrel's own Uformer code.
	$(PYTHON) -m pip install -q --no-deps --upgrade --target build/spandrel-env spandrel==0.4.2 einops==0.8.2 \
	  || echo "setup: spandrel not installed; its checks in tests/test_safetensors_export.py will skip"
	# Debian packages: OpenCV's headers and libraries for the C++ runner (make runner, make demo) and Chromium for
	# the browser tests of report.html. Installed with apt-get when root (as CI and containers are), else named.
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ] && command -v apt-get >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then echo "setup: apt-get install$$missing"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing) \
	    || echo "setup: apt-get failed; the C++ runner and the browser tests need:$$missing"; \
	  else echo "setup: the C++ runner (make runner) and the browser tests need Debian packages; run:"; \
	    echo "  sudo apt-get install --no-install-recommends$$missing"; fi; fi
	touch $@

test: setup
	$(PYTHON) -m pytest -q tests

DEVICE_NAME = $(shell $(PYTHON) -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')" 2>/dev/null)
BENCH_SUITES ?= loss models data

bench: setup
	mkdir -p benchmarks/results
	set -e; cd benchmarks && for s in $(BENCH_SUITES); do \
	  ../$(PYTHON) -m pytest -q bench_$$s.py --benchmark-json=results/bench_$${s}_$(DEVICE_NAME).json; done
	$(PYTHON) benchmarks/summarize.py benchmarks/results/bench_loss_$(DEVICE_NAME).json \
	  | tee benchmarks/results/bench_loss_$(DEVICE_NAME).md

# Compiles every CUDA source for each architecture, objects only: catches CUDA errors on machines without a GPU.
# The .cu files with nvcc for each arch; then the torch glue (csrc/cuda/*.cpp) with the host compiler against
# torch's own CUDA headers, which the CPU wheel ships. Those include the cuBLAS/cuSPARSE/cuSOLVER headers that a
# bare toolkit lacks (.ci/cuda_stub_include declares just the types they name, searched after every real include
# directory) and c10's generated CMake header (skipped with C10_CUDA_NO_CMAKE_CONFIGURE_FILE).
cuda-check: setup
	@command -v $(NVCC) >/dev/null || { echo "cuda-check: nvcc not found (set NVCC=...)"; exit 1; }
	mkdir -p build/cuda-check
	set -e; for f in $$(find csrc -name '*.cu'); do for a in $(CUDA_ARCHS); do \
	  echo "nvcc sm_$$a $$f"; \
	  $(NVCC) -std=c++20 -O3 -Icsrc -gencode arch=compute_$$a,code=sm_$$a -c $$f \
	    -o build/cuda-check/$$(basename $$f .cu).sm_$$a.o; done; done
	set -e; top=$$($(NVCC) --dryrun -c -x cu /dev/null 2>&1 | sed -n 's/^#\$$ TOP=//p'); \
	torch_inc=$$($(PYTHON) -c "from torch.utils.cpp_extension import include_paths; print(' '.join('-isystem ' + p for p in include_paths()))"); \
	for f in $$(find csrc/cuda -name '*.cpp'); do echo "c++ (torch CUDA glue) $$f"; \
	  $(CXX) -std=c++20 -O1 -Wall -Wextra -Werror -fPIC -DTUR_WITH_CUDA=1 -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE \
	    -Icsrc $$torch_inc -isystem $$top/include -idirafter .ci/cuda_stub_include \
	    -c $$f -o build/cuda-check/$$(basename $$f .cpp).o; done

# The CUDA kernels run on the CPU: every tests/test_*_emu.py builds the csrc/cuda/*.cu it drives against the emulator
# of tests/cuda_emu/ (cached in build/cuda_emu/ by a hash of its sources, so only a changed source is rebuilt) and
# compares it with the float64 reference; their slow mutation checks included.
cuda-emu: setup
	$(PYTHON) -m pytest -q $(wildcard tests/test_*_emu.py)

# The runner is optional for the demo: without OpenCV's headers it falls back to `tur restore` and says so.
demo: setup
	$(MAKE) runner || echo "demo: the C++ runner could not be built (OpenCV's packages: see make setup); using tur restore"
	$(PYTHON) -m tur_ext demo

# The C++ library and its tests through CMake against the libtorch inside the torch wheel.
cpp-test: setup
	$(CMAKE_CONFIGURE)
	cmake --build build/cmake -j 2
	ctest --test-dir build/cmake --output-on-failure

# The default fidelity study (about 35 min on 2 cores): benchmarks/fidelity/study.md was made by it.
study: setup
	$(PYTHON) -m tur_ext study configs/study_cpu.yaml --out runs/study

# The C++ runner build/tur-restore (needs OpenCV's Debian packages: see .ci/run).
CMAKE_CONFIGURE = cmake -S . -B build/cmake -G Ninja -DCMAKE_BUILD_TYPE=Release \
	  -DCMAKE_PREFIX_PATH="$$($(PYTHON) -c 'import torch; print(torch.utils.cmake_prefix_path)')"

runner: setup
	$(CMAKE_CONFIGURE) -DTUR_REQUIRE_RUNNER=ON
	cmake --build build/cmake --target tur-restore -j 2
	cp build/cmake/export/tur-restore build/tur-restore

# TransWeather's and Uformer's dynamic-shape torch.export and AOTInductor packages (minutes of compiling each on 2
# CPU cores; not in `make test`). Builds the runner first when it can.
slow-export-check: setup
	$(MAKE) runner || true
	TUR_SLOW_EXPORTS=1 $(PYTHON) -m pytest -q tests/test_transweather.py tests/test_uformer.py tests/test_models.py \
	  -k "dynamic or aoti or trace_and_export"

clean:
	rm -rf build $(VENV) tur_ext/_C*.so *.egg-info
