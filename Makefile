# Two commands do everything on a fresh machine:  `make run`  and  `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PORT ?= 7860
MODEL ?=
ARGS ?=

.PHONY: run test install bench bench-quality bench-compare lock test-latest clean

$(STAMP): pyproject.toml scripts/install.sh scripts/lock-cpu.txt scripts/lock-cuda.txt
	bash scripts/install.sh $(VENV)
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/python app.py --port $(PORT) $(if $(MODEL),--model $(MODEL)) $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(ARGS)

bench: $(STAMP)
	$(BIN)/python bench/train_speed.py

bench-quality: $(STAMP)
	$(BIN)/python bench/quality.py $(ARGS)

bench-compare: $(STAMP)
	$(BIN)/python bench/compare_diffusers.py $(ARGS)

# The install lock (scripts/lock-*.txt): regenerate it from a clean venv, or try the newest allowed versions.
lock:
	$(PY) scripts/lock.py lock

test-latest:
	$(PY) scripts/lock.py latest $(ARGS)

clean:
	rm -rf $(VENV) .venv-latest .pytest_cache
