# The two commands a newcomer needs: `make demo` and `make test`. Both install what is missing first.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test check table clean-cache

setup:
	@bash scripts/setup_env.sh

demo: setup
	$(PY) -m bench demo

test: setup
	$(PY) -m pytest -q

check: setup
	$(PY) -m bench check

table: setup
	$(PY) -m bench table

clean-cache:
	rm -rf $${MEDVLP_BENCH_CACHE:-$$HOME/.cache/medvlp-bench}/images $${MEDVLP_BENCH_CACHE:-$$HOME/.cache/medvlp-bench}/features
