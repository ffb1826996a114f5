# Two commands on a fresh machine: `make demo` runs the main job, `make test` the tests.
# Each builds its own virtual environment from pyproject.toml.
PYTHON ?= python3
DEMO_VENV := .venv-demo
TEST_VENV := .venv

.PHONY: demo test lint bench clean

$(DEMO_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(DEMO_VENV)
	$(DEMO_VENV)/bin/pip install -q --upgrade pip
	$(DEMO_VENV)/bin/pip install -q -e .
	touch $@

$(TEST_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(TEST_VENV)
	$(TEST_VENV)/bin/pip install -q --upgrade pip
	$(TEST_VENV)/bin/pip install -q -e ".[test]"
	touch $@

demo: $(DEMO_VENV)/.installed
	$(DEMO_VENV)/bin/nvmri demo --out nvmri-demo

test: $(TEST_VENV)/.installed
	$(TEST_VENV)/bin/python -m ruff check .
	$(TEST_VENV)/bin/python -m pytest -n 2 --dist loadgroup

bench: $(TEST_VENV)/.installed
	$(TEST_VENV)/bin/nvmri bench --json

clean:
	rm -rf $(DEMO_VENV) $(TEST_VENV) nvmri-demo
