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
# writes demo/comparison_mnist.gif, curves and attention maps, keeps the executed notebook in runs/demo/ (a rerun
# resumes from runs/mnist_comparison). Notebook parameters: make demo ARGS="-p steps 2000".
demo: install
	$(PY) demo.py $(ARGS)

# The commands behind the published results (demo/results_*.md, GIFs, curves, attention maps, weights/);
# resumes runs/results. MNIST: 3 seeds x (SAGAN, baseline, conditional SAGAN), 10 CPU-minutes each, two runs side
# by side on one thread each. CelebA's published pair predates the default recipe (see README, Results).
results: install
	$(PY) results.py mnist --minutes 10 --milestones 5 10 --seeds 0 1 2 --threads 1 --jobs 2
	$(PY) results.py celeba --steps 600 --checkpoint-every 200 --n 1000 --curve-n 500 --threads 1 --eval-threads 2

clean:
	rm -rf $(VENV) .pytest_cache
