# Two commands do everything on a fresh machine:  `make run`  and  `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PORT ?= 7860
MODEL ?=
ARGS ?=

.PHONY: run test install bench bench-quality clean

$(STAMP): pyproject.toml scripts/install.sh
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

clean:
	rm -rf $(VENV) .pytest_cache
bench-compare: $(STAMP) ; $(BIN)/python bench/compare_diffusers.py $(ARGS)
