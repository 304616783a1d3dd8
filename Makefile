PYTHON ?= python3
PIP ?= $(PYTHON) -m pip

.PHONY: install test lint typecheck check bench demo clean

install:  ## install jsworker with its dev tools (editable)
	$(PIP) install -q -e '.[dev]'

test:  ## run the test suite against real nats-server processes
	$(PYTHON) -m pytest -q

lint:
	$(PYTHON) -m ruff check jsworker tests bench
	$(PYTHON) -m ruff format --check jsworker

typecheck:
	$(PYTHON) -m mypy jsworker

check: lint typecheck test

bench:  ## throughput: jsworker vs raw nats-py on one embedded server
	$(PYTHON) bench/throughput.py

demo:
	jsworker dev --demo

clean:
	rm -rf build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
