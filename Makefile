# make demo: the whole study on synthetic data (local SQLite store); make test: the test suite.
# Both create .venv first. .venv/bin goes first on PATH: `mlflow run --env-manager local` runs the
# entry point's `python` from PATH, which must be the one with our packages.
PYTHON ?= python3
# make splits file names on spaces: a checkout whose path holds one would half-build .venv elsewhere
ifneq ($(word 2,$(CURDIR)),)
$(error the checkout's path "$(CURDIR)" holds a space, which make cannot use in file names: clone or move it to a path without spaces)
endif
VENV := $(CURDIR)/.venv
HOST_PATH := $(PATH)# PYTHON as the caller's PATH finds it, never .venv's own python3
export PATH := $(VENV)/bin:$(PATH)
export MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR := false
# Python writes its bytecode cache (.pyc) in .venv and MLflow's environments even where
# PYTHONDONTWRITEBYTECODE is set (this project's machines set it; uv compiles nothing as it
# installs): otherwise no process ever wrote one, and each compiled torch and MLflow again
# (importing the pipeline took 14-15 s against 5.5-5.9 s; docs/benchmarks.md)
unexport PYTHONDONTWRITEBYTECODE

# The demo scale (params/scale_demo.yaml) sizes every stage; selection on a validation split,
# so the champion's test accuracy is a fair figure.
DEMO_ARGS := -P dataset=synthetic -P scale=demo -P val_split=0.1
DEMO_SAMPLES := demo_samples
# synthetic data registers under a model name of its own: it never competes with a real-data model
# (predict -P dataset=synthetic uses its champion)
DEMO_MODEL := svhn-classifier-synthetic
# the demo's runs in an experiment of their own, which the UI line at the end opens
DEMO_EXPERIMENT := svhn-demo
# make demo ENV_MANAGER=uv: main and every stage in the environment uv builds from conda.yaml.
# uv never reads pip's configuration, so it is told where pip finds wheels (torch's on this disk,
# not a 3 GB download); a UV_* variable you set yourself wins.
ENV_MANAGER ?= local
ifeq ($(ENV_MANAGER),uv)
WITH_PIP_SOURCES := $(VENV)/bin/python scripts/demo.py with-pip-sources
endif

.PHONY: install test test-fast mutate demo bench clean

install: $(VENV)/.installed

# uv installs the lock (pip took about 2 minutes of a fresh demo, uv 26 s), from where pip
# would take it (with-pip-sources); pip only installs uv itself, at the lock's version.
UV_PIN := $(shell grep '^uv==' requirements.lock)
ifeq ($(UV_PIN),)
$(error requirements.lock pins no uv==VERSION, which make install needs to install the lock: add it back)
endif
UV_INSTALL := $(VENV)/bin/python scripts/demo.py with-pip-sources $(VENV)/bin/uv pip install --python $(VENV)/bin/python --quiet

$(VENV)/.installed: requirements.lock pyproject.toml
	@PATH='$(HOST_PATH)' $(PYTHON) -c 'import sys; v = sys.version_info; sys.exit(None if v[:2] == (3, 11) else f"$(PYTHON) is Python {v[0]}.{v[1]}: this project needs 3.11 (pyproject.toml); run make again with PYTHON=python3.11")'
	@# a .venv of another Python, or one whose venv stopped before pip (no python3-venv), is made again
	$(VENV)/bin/python -c 'import sys, pip; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null || PATH='$(HOST_PATH)' $(PYTHON) -m venv --clear $(VENV)
	$(VENV)/bin/python -m pip install --quiet "$(UV_PIN)"
	$(UV_INSTALL) -r requirements.lock
	$(UV_INSTALL) --no-deps -e .
	touch $@

# Two test processes (pytest-xdist), each file whole in one (its module fixtures built once; every
# Ray test is in test_ray.py) and one torch thread each: most of an end-to-end test is
# single-threaded process start-up (torch, torchvision and mlflow imports), so two at a time on
# two cores took 26 instead of 39 minutes on a slow CI-sized machine; three were no faster
# (docs/testing.md: the cores were full and the Ray file became the long pole). TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2

# lint-imports first: the layer contract in pyproject.toml (no room imports one above it, no circles)
test: install
	$(VENV)/bin/lint-imports
	$(VENV)/bin/python -m pytest tests -n $(TEST_WORKERS) --dist loadfile --durations=15

test-fast: install
	$(VENV)/bin/lint-imports
	$(VENV)/bin/python -m pytest tests -m "not e2e"

# Mutation testing (not part of `make test`): the training loop, config, models, batched
# augmentation, the served Classifier and the evaluation metrics, against the unit tests only.
# One child, one thread, low priority. Score and survivors go to docs/testing.md.
MUTATE_FUNCTIONS := 'pipeline.train.*' 'pipeline.config.*' 'pipeline.models.*' \
	'pipeline.runtime.*' 'pipeline.keys.*' 'pipeline.rng.*' 'pipeline.batching.x_normalise*' 'pipeline.batching.x_center_crop*' 'pipeline.batching.x_sample_augment_params*' \
	'pipeline.batching.x_augment*' 'pipeline.batching.xǁTensorBatchesǁ*' \
	'pipeline.registry.xǁClassifierǁ*' 'pipeline.predict.x_confusion_metrics*'

mutate: install
	rm -rf mutants
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 nice -n 15 $(VENV)/bin/mutmut run --max-children 1 $(MUTATE_FUNCTIONS)
	$(VENV)/bin/python .ci/mutation_report.py $(MUTATE_FUNCTIONS)

demo: install
	$(WITH_PIP_SOURCES) mlflow run . -e main --env-manager $(ENV_MANAGER) --experiment-name $(DEMO_EXPERIMENT) $(DEMO_ARGS) \
		-P env_manager=$(ENV_MANAGER)
	@echo
	$(VENV)/bin/python scripts/demo.py samples $(DEMO_SAMPLES) $(subst -P ,,$(DEMO_ARGS))
	$(WITH_PIP_SOURCES) mlflow run . -e predict --env-manager $(ENV_MANAGER) --experiment-name $(DEMO_EXPERIMENT) -P input=$(DEMO_SAMPLES) \
		-P output=demo_predictions.csv -P dataset=synthetic
	@$(VENV)/bin/python scripts/demo.py report demo_predictions.csv $(DEMO_MODEL)
	@echo
	@echo "Done. Browse the runs, compare the sweeps and see the registered model with:"
	@echo "  $(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db"
	@$(VENV)/bin/python scripts/demo.py ui $(DEMO_EXPERIMENT)

bench: install
	$(VENV)/bin/python benchmarks/throughput.py
	$(VENV)/bin/python benchmarks/learnability.py

clean:
	rm -rf mlflow.db mlruns mlartifacts .svhn-cache data/synthetic $(DEMO_SAMPLES) demo_predictions.csv mutants
