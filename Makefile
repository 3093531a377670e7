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

# The main job: SAGAN and its baseline on MNIST, headless, as the notebook runs it, with progress in the terminal;
# keeps the executed notebook as runs/demo/SAGAN_mnist.ipynb and its GIF, curves and attention maps in
# runs/demo/SAGAN_mnist/ (a rerun resumes from runs/mnist_comparison). Notebook parameters: make demo ARGS="-p steps 2000".
demo: install
	$(PY) demo.py $(ARGS)

# The commands behind the published results (demo/results_*.md, GIFs, curves, attention maps, weights/); they resume
# runs/results. MNIST: 3 seeds x (baseline, SAGAN, conditional SAGAN) of the default recipe, 30 CPU-minutes each,
# scored at 10 and 30, two runs side by side on one thread each. CelebA: the pair, 5,000 steps of the default recipe,
# side by side (hours).
results: install
	$(PY) results.py mnist --minutes 30 --milestones 10 30 --seeds 0 1 2 --threads 1 --jobs 2
	$(PY) results.py celeba --recipe default --steps 5000 --eval-every 1000 --curve-n 500 --threads 1 --jobs 2

clean:
	rm -rf $(VENV) .pytest_cache
