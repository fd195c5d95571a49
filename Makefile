# The README's two commands: `make repro` (the main job) and `make test`. Both run the idempotent set-up.
VENV ?= .venv
export HF_HUB_OFFLINE := 1
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup repro test bench mlflow-ui postgres postgres-stop mlflow-server

setup:
	VENV=$(VENV) bash scripts/setup.sh

repro: setup          ## dvc repro on the default profile
	asrlab check   # every section of params.yaml, before dvc removes any output
	dvc repro

test: setup           ## the test suite (includes a smoke-profile dvc repro in a temporary copy)
	pytest -q

bench: setup          ## benchmarks -> results/bench/*.json (run on a quiet machine; train needs `make repro` first)
	python benchmarks/data_bench.py
	python benchmarks/train_bench.py
	python benchmarks/syn2real_bench.py
	python benchmarks/sweep_bench.py
	python benchmarks/hdmole_bench.py

mlflow-ui: setup      ## browse every run: http://127.0.0.1:5000
	mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port 5000

# Scaling out (README "Scaling out"): a PostgreSQL cluster on loopback for Optuna and MLflow, and an MLflow
# tracking server on it. Override e.g. `make postgres PGDIR=/srv/pg PGPORT=5434`.
PGDIR ?= $(CURDIR)/../asrlab-postgres
# Port 5433, not 5432: Debian's own postgresql service may hold 5432.
PGPORT ?= 5433
MLFLOW_HOST ?= 127.0.0.1
MLFLOW_PORT ?= 5000
MLFLOW_WORKERS ?= 2
MLFLOW_BACKEND ?= postgresql://asrlab@127.0.0.1:$(PGPORT)/mlflow
MLFLOW_ARTIFACTS ?= $(CURDIR)/../asrlab-mlartifacts

postgres:             ## PostgreSQL on 127.0.0.1:PGPORT in PGDIR, databases optuna and mlflow (prints their URLs)
	bash scripts/postgres-local.sh start $(PGDIR) $(PGPORT)
	bash scripts/postgres-local.sh createdb $(PGDIR) optuna
	bash scripts/postgres-local.sh createdb $(PGDIR) mlflow

postgres-stop:
	bash scripts/postgres-local.sh stop $(PGDIR)

mlflow-server:        ## MLflow server: runs in MLFLOW_BACKEND, artifacts on local disk; export MLFLOW_TRACKING_URI=http://MLFLOW_HOST:MLFLOW_PORT
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow server --backend-store-uri $(MLFLOW_BACKEND) \
	  --artifacts-destination $(MLFLOW_ARTIFACTS) --host $(MLFLOW_HOST) --port $(MLFLOW_PORT) --workers $(MLFLOW_WORKERS)
