# Two commands on a fresh machine:
#   make lab    set up .venv (if missing), start JupyterLab on the notebooks and print its URL (localhost, token)
#   make test   set up .venv (if missing) and run the whole test suite (unit tests + notebooks in quick mode)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 8888
# Empty: each `make lab` draws one fresh token, in the recipe's shell, so the URL it prints and the
# server agree. `make lab LAB_TOKEN=...` fixes it (a name no unrelated environment variable is likely to have).
LAB_TOKEN ?=
ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root,)

.PHONY: setup lab test lint reproduce results clean-venv

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# Pinned first: this pair comes from local wheels; an unpinned torch would pull a multi-GB build.
	$(BIN)/python -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

setup: $(BIN)/.installed

# The token reaches the server through JUPYTER_TOKEN (not its command line, where `ps` shows it). Jupyter
# masks it in its own log, so the first line printed is the URL to open. A busy port is an error
# (port_retries=0), never a silent move to a port other than the one printed.
lab: setup
	@token="$(LAB_TOKEN)"; \
	if [ -z "$$token" ]; then token=$$($(BIN)/python -c "import secrets; print(secrets.token_hex(16))"); fi; \
	echo "JupyterLab: http://127.0.0.1:$(PORT)/lab/tree/00_toy_world.ipynb?token=$$token"; \
	JUPYTER_TOKEN="$$token" exec $(BIN)/jupyter lab --no-browser $(ROOT_FLAG) --ServerApp.ip=127.0.0.1 \
		--ServerApp.port=$(PORT) --ServerApp.port_retries=0 --ServerApp.root_dir=notebooks \
		--LabApp.default_url=/lab/tree/00_toy_world.ipynb

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: setup lint
	# One thread per process: the distributed tests run several processes on few cores.
	WORKBENCH_QUICK=1 OMP_NUM_THREADS=1 $(BIN)/python -m pytest --nbval-lax -q tests notebooks

reproduce: setup
	$(BIN)/python -m workbench reproduce

# The committed report the README points to: docs/results/reproduce.md and its figures, full mode.
results: setup
	$(BIN)/python -m workbench reproduce --out docs/results

clean-venv:
	rm -rf $(VENV)
