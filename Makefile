# PYTHON installs and runs the project. An activated virtual or conda environment, or any
# python3 that pip may install into, is used as it is. A system Python marked "externally
# managed" (PEP 668: Debian, Ubuntu) must not be changed by pip, so the project gets its own
# environment in .venv instead. `make install PYTHON=/path/to/python` overrides the choice.
SYSTEM_PYTHON ?= python3
VENV := .venv
ifeq ($(origin PYTHON),undefined)
  EXTERNALLY_MANAGED := $(shell $(SYSTEM_PYTHON) -c 'import os, sys, sysconfig; \
    print(int(sys.prefix == sys.base_prefix and \
    os.path.isfile(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED"))))' 2>/dev/null)
  PYTHON := $(if $(filter 1,$(EXTERNALLY_MANAGED)),$(VENV)/bin/python,$(SYSTEM_PYTHON))
endif
USES_VENV := $(filter $(VENV)/bin/python,$(PYTHON))

# Flags added to the quick-start run: make synthetic ARGS="--epochs 5"
ARGS ?=

.PHONY: install synthetic test bench python need-python

install: $(USES_VENV)
	$(PYTHON) -m pip install -r requirements.txt
	$(PYTHON) -m pip install --no-deps -e .
	@echo "Installed with $(PYTHON)."
	@$(if $(USES_VENV),echo "Run python -m ... commands after: source $(VENV)/bin/activate",true)

$(VENV)/bin/python:
	$(SYSTEM_PYTHON) -m venv $(VENV) || { rm -rf $(VENV); \
	  echo "error: could not create $(VENV); install the venv module (Debian: apt install python3-venv)" >&2; \
	  exit 1; }

synthetic: need-python
	$(PYTHON) -m and_mask.run_synthetic --method and_mask --agreement_threshold 1 \
	  --scale_grad_inverse_sparsity 1 --use_cuda 0 $(ARGS)

test: need-python
	OMP_NUM_THREADS=2 $(PYTHON) -m pytest -q

bench: need-python
	$(PYTHON) tests/benchmarks/bench_grads.py

python:
	@echo $(PYTHON)

need-python:
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found: run make install first" >&2; exit 1; }
