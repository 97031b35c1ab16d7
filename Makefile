# One entry point for setup + demo, one for the tests (what .ci/run calls).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NODES ?= 3
TOKENS ?= 300

.PHONY: demo test test-fast setup clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

# Distributed generation on $(NODES) local nodes with the bundled model.
demo: $(STAMP)
	$(BIN)/mdi run --ckpt models/shakespeare-char --nodes $(NODES) --n-samples 3 \
		--n-tokens $(TOKENS) --prompt "ROMEO:"

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) .pytest_cache
