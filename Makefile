# The two commands a fresh machine needs: `make demo` and `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip

.PHONY: venv install demo test up down status lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	# CPU machines: the CPU build of torch first (a local file here); a GPU machine already
	# has a CUDA torch installed, or set TORCH_SPEC to the build it wants.
	$(PIP) install -q "$${TORCH_SPEC:-torch==2.13.0}"
	# DeepSpeed ships an sdist whose build imports torch: build it against the torch above.
	$(PIP) install -q --no-build-isolation "deepspeed>=0.16"
	$(PIP) install -q -e ".[dev]"
	touch $@

venv install: $(VENV)/.installed

up: install
	$(PY) -m orchestrator.stack up

down:
	$(PY) -m orchestrator.stack down

status:
	$(PY) -m orchestrator.stack status

demo: install
	$(PY) -m orchestrator.demo

test: install
	$(PY) -m pytest -q -ra

lint: install
	$(VENV)/bin/ruff check orchestrator jobs datasets tests bench

clean:
	rm -rf $(VENV)
