# `make test` and `make demo` set up their own environment in .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SHARED_DATA := $(abspath ../shared/data)

.PHONY: install test demo clean

$(VENV)/.installed: requirements.txt requirements-nodeps.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-nodeps.txt
	touch $@

install: $(VENV)/.installed

# Tests find real data through SAGAN_DATA (default: ../shared/data) and skip, saying why, without it.
test: install
	SAGAN_DATA=$${SAGAN_DATA:-$(SHARED_DATA)} $(PY) -m pytest

clean:
	rm -rf $(VENV) .pytest_cache
