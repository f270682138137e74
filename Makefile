# Two commands do all set-up on a fresh machine:
#   make demo   -- build .venv if missing, run the demo
#   make test   -- build .venv if missing, run the test suite
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed-$(shell cat pyproject.toml requirements-dev.txt 2>/dev/null | cksum | cut -d' ' -f1)

.PHONY: venv demo test bench clean

venv: $(STAMP)

$(STAMP):
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the CPU build of torch (already on these machines); a bare `torch` would pull a 5.6 GB CUDA build
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -e .
	rm -f $(VENV)/.installed-*; touch $@

demo: venv
	$(PY) demo/demo.py

test: venv
	$(PY) -m pytest -q -n 2 --dist loadfile

bench: venv
	$(PY) -m bench.run

clean:
	rm -rf $(VENV)
