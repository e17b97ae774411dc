# Two commands on a fresh machine:  `make demo`  and  `make test`.
VENV = $(shell scripts/venv.sh)
PYTHON = $(VENV)/bin/python

.PHONY: demo test test-fast test-all bench venv two-node image

venv:
	@echo $(VENV)

# The main job on the embedded default: synthetic fundus data -> prepare -> Ray Train DDP.
demo:
	$(PYTHON) jobs/train.py --config configs/demo.yaml

# What CI runs (.ci/run): everything except the `slow` marker, well under 15 min on 2 cores.
test:
	$(PYTHON) -m pytest -m "not slow" -q --durations=12

# After every change: no Ray start (a test that starts Ray unmarked fails), nothing slow.
test-fast:
	APTOS_RAY_FAST_TIER=1 $(PYTHON) -m pytest -m "not slow and not ray" -q --durations=12

test-all:
	$(PYTHON) -m pytest -q

bench:
	$(PYTHON) benchmarks/run.py

# Two Ray nodes on this machine, the second unable to see the driver's files (mount namespace;
# root): prepare, train and predict on s3:// URIs (moto) succeed, local paths fail clearly. ~10 min.
two-node:
	$(PYTHON) scripts/masked_node_run.py

# The cluster image (cluster/Dockerfile; needs Docker). IMAGE_VARIANT=cpu for the head's image.
IMAGE_VARIANT = gpu
image:
	python3 scripts/cluster_image.py --variant $(IMAGE_VARIANT)
