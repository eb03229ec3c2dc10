# Two commands do everything on a fresh machine with Python 3.10+ and make:
#   make demo   -- build the local venv and run the demo
#   make test   -- build the local venv and run the test suite
PYTHON ?= python3
# Optional: the package index to take torch from (e.g. PyTorch's CPU-only wheel index).
TORCH_INDEX_URL ?=
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip
STAMP   = $(VENV)/.installed

.PHONY: demo test test-quick venv bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c constraints.txt torch==2.13.0 $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	$(PIP) install --quiet -c constraints.txt -e '.[test,docs]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m quantsim.demo

test: $(STAMP)
	$(PY) -m pytest -q

# local lane: skips the slow real-model tests (CI runs everything through `make test`)
test-quick: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

bench: $(STAMP)
	for b in benchmarks/[a-z]*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info
