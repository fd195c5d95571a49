# The README's two commands: `make repro` (the main job) and `make test`. Both run the idempotent set-up.
VENV ?= .venv
export HF_HUB_OFFLINE := 1
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup repro test bench mlflow-ui

setup:
	VENV=$(VENV) bash scripts/setup.sh

repro: setup          ## dvc repro on the default profile
	dvc repro

test: setup           ## the test suite (includes a smoke-profile dvc repro in a temporary copy)
	pytest -q

bench: setup          ## benchmarks -> results/bench/*.json (run on a quiet machine; train needs `make repro` first)
	python benchmarks/data_bench.py
	python benchmarks/train_bench.py
	python benchmarks/syn2real_bench.py
	python benchmarks/hdmole_bench.py

mlflow-ui: setup      ## browse every run: http://127.0.0.1:5000
	mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port 5000
