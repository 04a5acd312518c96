PYTHON ?= python3

.PHONY: install test bench

install:
	$(PYTHON) -m pip install -r requirements.txt
	$(PYTHON) -m pip install --no-deps -e .

test:
	OMP_NUM_THREADS=2 $(PYTHON) -m pytest -q

bench:
	$(PYTHON) tests/benchmarks/bench_grads.py
