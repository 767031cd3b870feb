# make test: set up .venv (if needed) and run the suite.  make demo: set up and run the toy pipeline.
PYTHON ?= python3
PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: venv test demo bench clean

venv: $(STAMP)

$(STAMP): requirements.txt constraints.txt
	test -x $(PY) || $(PYTHON) -m venv .venv
	$(PY) -m pip install -q -r requirements.txt pytest pytorch-fid==0.3.0 -c constraints.txt
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(PY) demo.py --out runs/demo

bench: $(STAMP)
	$(PY) bench/sampling.py
	$(PY) bench/train_step.py
	$(PY) bench/fid.py

clean:
	rm -rf .venv runs .pytest_cache
