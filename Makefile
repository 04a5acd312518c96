PYTHON ?= python3

.PHONY: install test test-slow bench quickstart

install:
	$(PYTHON) -m pip install -r requirements.txt
	$(PYTHON) -m pip install --no-deps -e .

test:
	OMP_NUM_THREADS=2 $(PYTHON) -m pytest -q

test-slow:
	$(PYTHON) -m pytest -q -m slow

bench:
	$(PYTHON) tests/benchmarks/bench_grads.py
