# The two commands a newcomer needs:
#   make run    set up and run the quickstart (a CA and a sidecar on SQLite, loopback)
#   make test   set up and run the whole test suite (lint, types, generated-code drift, tests)
.PHONY: run test venv proto lint fmt bench bench-dataplane clean

VENV ?= .venv
PY := $(VENV)/bin/python

run: venv
	$(PY) scripts/quickstart.py

test:
	bash scripts/test.sh

venv:
	bash scripts/bootstrap.sh

proto: venv
	$(PY) proto/gen.py

fmt: venv
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: venv
	$(PY) bench/issuance.py

bench-dataplane: venv
	bash scripts/system-deps.sh
	$(PY) -m bench.dataplane

clean:
	rm -rf $(VENV) .meshtls .pytest_cache .mypy_cache .ruff_cache
