# `make train`, `make test` and `make bench`. Each creates .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# torch first (from the local wheel cache), deepspeed after it: deepspeed's sdist imports torch when it builds.
TORCH  := torch==2.14.1 torchvision==0.29.1

.PHONY: train test bench ablate setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

train: $(STAMP)
	$(BIN)/accelerate launch --config_file launch_configs/cpu.yaml recipes/image_classification.py \
		--config recipes/configs/image_classification.yaml --overwrite true $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Every benchmark side by side (~15 minutes on 2 cores); the table goes to benchmarks/results/summary.md.
bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py $(BENCH_ARGS)

# Which techniques help: baseline vs one technique added, 5 seeds each, fresh processes (~26 min planned on 2 quiet
# cores); tables in benchmarks/results/ablation.md, the figure in ablation.png. `ABLATE_ARGS=--smoke`: a minute.
ablate: $(STAMP)
	$(BIN)/python benchmarks/ablation.py $(ABLATE_ARGS)

clean:
	rm -rf $(VENV) outputs wandb
