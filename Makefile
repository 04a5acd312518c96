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

# The tool that writes the lock, at a fixed release so that the lock's format does not drift.
UV := uv==0.13.10

.PHONY: install lock test-latest synthetic test bench python need-python

# The tested versions: requirements.txt pins every package, with its hashes, for every supported
# Python (3.11 to 3.13) and platform; the project itself goes in editable, without its loose bounds.
install: $(USES_VENV)
	$(PYTHON) -m pip install -r requirements.txt
	$(PYTHON) -m pip install --no-deps -e .
	@echo "Installed with $(PYTHON)."
	@$(if $(USES_VENV),echo "Run python -m ... commands after: source $(VENV)/bin/activate",true)

$(VENV)/bin/python:
	$(SYSTEM_PYTHON) -m venv $(VENV) || { rm -rf $(VENV); \
	  echo "error: could not create $(VENV); install the venv module (Debian: apt install python3-venv)" >&2; \
	  exit 1; }

# Re-resolve setup.py's loose requirements and requirements.in's torch pins into requirements.txt:
# one command, one reviewed diff. uv pip compile --universal writes one lock for every Python from
# 3.11 and every platform, with markers where versions differ.
lock: need-python
	$(PYTHON) -m pip install -q $(UV)
	$(PYTHON) -m uv pip compile -q setup.py requirements.in --all-extras --universal --python-version 3.11 \
	  --generate-hashes --custom-compile-command "make lock" -o requirements.txt

# The newest release of every dependency in a throw-away environment, the suite run there, and one
# line: which packages differ from the lock and which tests fail with them. Not part of CI.
test-latest: need-python
	$(PYTHON) tests/support/latest_report.py

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
