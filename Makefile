# troupe: two commands on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv test test-fast demo lint bench bench-learning bench-rm bench-real bench-recovery bench-async bench-scale clean-venv

venv: $(STAMP)

$(STAMP): requirements/cpu-lock.txt requirements/cpu-pins.in pyproject.toml scripts/install_cpu.sh
	bash scripts/install_cpu.sh $(PY) $(VENV)
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=40 tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q tests -m "not integration and not slow"

# run.overwrite=true: a second `make demo` replaces outputs/demo instead of refusing it
demo: $(STAMP)
	$(BIN)/troupe train --config-name demo run.overwrite=true

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/python -m bench.generator_dtype

bench-learning: $(STAMP)
	$(BIN)/python -m bench.learning_check

bench-rm: $(STAMP)
	$(BIN)/python -m bench.reward_models

# GRPO on GSM8K and arena-hard prompts scored by the bench-rm bundle, before/after over seeds (needs ../shared/data)
bench-real: $(STAMP)
	$(BIN)/python -m bench.real_data

bench-recovery: $(STAMP)
	$(BIN)/python -m bench.recovery

# sync against async (run.mode=async) on SmolLM2 for the same samples, with the staleness distribution
bench-async: $(STAMP)
	$(BIN)/python -m bench.async

# weight sync (1 and 2 generators) against an in-process reload, and the time to add a generator
bench-scale: $(STAMP)
	$(BIN)/python -m bench.scale

# the learn phase alone on the demo's model, 2 ranks x 1 thread against 1 rank x 2 threads, against the roofline
.PHONY: bench-learn
bench-learn: $(STAMP)
	$(BIN)/python -m bench.learn_phase $(BENCH_ARGS)

# troupe vs TRL GRPO, one after the other (installs TRL into .bench-trl/ on first use): make bench-trl BENCH_ARGS="--steps 10"
.PHONY: bench-trl
bench-trl: $(STAMP)
	$(BIN)/python -m bench.vs_trl $(BENCH_ARGS)

# every benchmark's --smoke mode (tiny model, a step or two, temporary outputs): exits non-zero if any broke.
# One benchmark: .venv/bin/python -m bench.<name> --smoke [--out FOLDER]
.PHONY: bench-smoke
bench-smoke: $(STAMP)
	$(BIN)/python -m pytest -q tests/integration/test_bench_smoke.py --durations=0

clean-venv:
	rm -rf $(VENV)
