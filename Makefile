# Two commands on a fresh machine:
#   make lab    set up .venv (if missing) and open JupyterLab on the notebooks (localhost, with a token)
#   make test   set up .venv (if missing) and run the whole test suite (unit tests + notebooks in quick mode)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 8888
TOKEN ?= $(shell $(PYTHON) -c "import secrets; print(secrets.token_hex(16))")
ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root,)

.PHONY: setup lab test lint reproduce clean-venv

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# Pinned first: this pair comes from local wheels; an unpinned torch would pull a multi-GB build.
	$(BIN)/python -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

setup: $(BIN)/.installed

lab: setup
	@echo "JupyterLab: http://127.0.0.1:$(PORT)/lab/tree/00_toy_world.ipynb?token=$(TOKEN)"
	$(BIN)/jupyter lab --no-browser $(ROOT_FLAG) --port $(PORT) --ServerApp.ip=127.0.0.1 \
		--IdentityProvider.token=$(TOKEN) --ServerApp.root_dir=notebooks \
		--LabApp.default_url=/lab/tree/00_toy_world.ipynb

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: setup lint
	# One thread per process: the distributed tests run several processes on few cores.
	WORKBENCH_QUICK=1 OMP_NUM_THREADS=1 $(BIN)/python -m pytest --nbval-lax -q tests notebooks

reproduce: setup
	$(BIN)/python -m workbench reproduce

clean-venv:
	rm -rf $(VENV)
