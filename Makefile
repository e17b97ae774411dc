# Two commands on a fresh machine:  `make demo`  and  `make test`.
VENV = $(shell scripts/venv.sh)
PYTHON = $(VENV)/bin/python

.PHONY: demo test test-all bench venv

venv:
	@echo $(VENV)

# The main job on the embedded default: synthetic fundus data -> prepare -> Ray Train DDP.
demo:
	$(PYTHON) jobs/train.py --config configs/demo.yaml

# What CI runs (.ci/run): everything except the `slow` marker, well under 15 min on 2 cores.
test:
	$(PYTHON) -m pytest -m "not slow" -q --durations=12

test-all:
	$(PYTHON) -m pytest -q

bench:
	$(PYTHON) benchmarks/run.py
