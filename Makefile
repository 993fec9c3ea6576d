# Two commands do all set-up on a fresh machine with Python >= 3.11 and make:
#   make demo   synthetic slides -> tile pairs -> short distillation -> timm export -> slide embeddings (CPU)
#   make test   the test suite (what .ci/run calls)
# `make demo` installs the package alone (~1.4 GB); `make test` adds the test and AOT extras to the same
# virtualenv (torch + timm + transformers + dinov2 for parity, libtpu for TPU compile checks: ~6.7 GB).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
BASE   := $(VENV)/.installed-base
FULL   := $(VENV)/.installed-test
DEMO   ?= demo_out
PYTEST_ARGS ?=

.PHONY: demo test bench clean

$(BASE): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e .
	touch $(BASE)

$(FULL): $(BASE)
	$(PY) -m pip install -e ".[test,tpu-aot]"
	$(PY) -m pip install --no-deps "dinov2==0.0.1.dev2"  # official DINOv2 code for tests; see pyproject's test extra
	touch $(FULL)

demo: $(BASE)
	$(PY) -m xmag_jax.demo --out $(DEMO)

# ruff first (rules in pyproject.toml); pytest exits 5 when it collected no test: a failure here, not a pass.
test: $(FULL)
	$(VENV)/bin/ruff check .
	@rc=0; $(PY) -m pytest -q $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache
