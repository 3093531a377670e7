# `make test` and `make demo` set up their own environment in .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SHARED_DATA := $(abspath ../shared/data)

.PHONY: install test demo results clean

$(VENV)/.installed: requirements.txt requirements-nodeps.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-nodeps.txt
	touch $@

install: $(VENV)/.installed

# Tests find real data through SAGAN_DATA (default: ../shared/data) and skip, saying why, without it.
test: install
	SAGAN_DATA=$${SAGAN_DATA:-$(SHARED_DATA)} $(PY) -m pytest

# The main job: SAGAN and its baseline on MNIST, headless, as the notebook runs it; writes
# demo/comparison_mnist.gif, curves and attention maps (a rerun resumes from runs/mnist_comparison).
demo: install
	$(VENV)/bin/jupyter execute SAGAN_mnist.ipynb

# The commands behind every published result (demo/results_*.md, GIFs, curves, attention maps, weights/),
# each arm on 1 thread (see README, Results); resumes runs/results.
results: install
	$(PY) results.py mnist --steps 5000 --threads 1
	$(PY) results.py celeba --steps 600 --checkpoint-every 200 --n 1000 --curve-n 500 --threads 1 --eval-threads 2

clean:
	rm -rf $(VENV) .pytest_cache
