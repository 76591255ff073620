# The two set-up commands of the README. Both create (or reuse) .venv/ in this checkout and
# install what they need: torch pinned first (pip takes the CPU wheel on a CPU machine and the
# CUDA build on a GPU cluster), then umv2 itself with triton==3.7.1, which torch 2.13.0's CUDA
# build pins too.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test

demo: $(BIN)/umv2
	$(BIN)/umv2 model presets
	$(BIN)/umv2 model info ultramemv2-227m
	rm -rf out/demo-run
	$(BIN)/umv2 train --preset tiny-ultramemv2 --data builtin --steps 60 --ckpt-every 10 --out out/demo-run

test: $(BIN)/umv2
	$(BIN)/python -m pytest tests

$(BIN)/umv2: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@
