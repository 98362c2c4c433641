# make demo: the built-in example (scripts/demo.sh) in .venv, created from requirements.txt if missing
# make test: the test suite in .venv, in two processes (a test file's tests share one); ARGS='...' goes to pytest,
#            e.g. make test ARGS='-m "not slow"'  or  make test ARGS='-m cuda'  or  make test ARGS='-k plugin'
# PYTHON=/path/to/python make demo   uses an existing environment instead of .venv
VENV := .venv
PYTHON ?= $(VENV)/bin/python

.PHONY: demo test venv

demo: venv
	PYTHON=$(PYTHON) bash scripts/demo.sh

test: venv
	$(PYTHON) -m pytest -q -n 2 --dist loadfile tests $(ARGS)

# .venv is (re)installed when missing or older than requirements.txt; another PYTHON is used as it is
venv: $(if $(filter $(VENV)/bin/python,$(PYTHON)),$(VENV)/.installed)

$(VENV)/.installed: requirements.txt
	test -x $(VENV)/bin/python || python3 -m venv $(VENV)
	$(VENV)/bin/pip install -r requirements.txt
	touch $@
