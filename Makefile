PYTHON ?= python3
PIP ?= $(PYTHON) -m pip

.PHONY: install test lint typecheck check bench bench-throughput bench-partitions demo clean

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

bench:  ## the whole suite: jsworker (asyncio, uvloop) vs raw nats-py, taskiq, FastStream, nats-py-worker
	$(PYTHON) bench/suite.py

bench-throughput:  ## drain throughput, jsworker vs raw nats-py, in one process
	$(PYTHON) bench/throughput.py

bench-partitions:  ## rebalance and singleton failover times, partitioned throughput
	$(PYTHON) bench/partitions.py

demo:
	jsworker dev --demo

clean:
	rm -rf build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
