# The two set-up commands of the README. Both create (or reuse) .venv/ in this checkout and
# install what they need: torch pinned first (pip takes the CPU wheel on a CPU machine and the
# CUDA build on a GPU cluster), then umv2 itself with triton==3.7.1, which torch 2.13.0's CUDA
# build pins too.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test chromium

# The smoke sweep (idempotent: a second `make demo` skips its finished runs), its fit, its report;
# then the report of the first real answer shipped in results/ (its runs table, re-fitted here).
demo: $(BIN)/umv2
	$(BIN)/umv2 model presets
	$(BIN)/umv2 model info ultramemv2-227m
	$(BIN)/umv2 sweep run recipes/smoke.toml --out out
	$(BIN)/umv2 fit out/smoke
	$(BIN)/umv2 report out/smoke
	$(BIN)/umv2 report results/micro-cpu/results.parquet --out out/micro-cpu-report.html

test: $(BIN)/umv2 chromium
	$(BIN)/python -m pytest tests

# The report tests open pages in Debian's headless Chromium: installed here when missing (as root).
chromium:
	@if [ ! -x /usr/bin/chromium ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium; \
	  else echo "make test: Chromium is missing; install it with 'sudo apt-get install chromium'" \
	    "(the report tests skip without it, and fail under CI=true)"; fi; \
	fi

$(BIN)/umv2: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@
