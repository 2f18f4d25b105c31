# One entry point for people and CI. `make test` builds everything it needs from scratch.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test test-fast demo bench clean

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip wheel setuptools
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -c "import mambavision, dino, eval; print('imports ok; models:', mambavision.list_models())"
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(PY) scripts/demo.py --output-dir outputs/demo

bench: $(STAMP)
	$(PY) benchmarks/bench_selective_scan.py

clean:
	rm -rf $(VENV) outputs build *.egg-info
