# The targets the README names. `make run` and `make test` each install what they need first.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
RUN_DIR ?= runs/dmil-digits

.PHONY: install system-deps run test bench bench-quick profile clean

# Debian's espeak-ng speaks the digits of the built-in `digits` dataset.
system-deps:
	@command -v espeak-ng >/dev/null || { apt-get update -qq && apt-get install -y -qq --no-install-recommends espeak-ng; }

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: system-deps $(VENV)/.installed

# The main job: DMIL with small default towers on the built-in `digits` data -> checkpoint, report, plot.
run: install
	$(VENV)/bin/dmil train --dataset digits --method dmil --output-dir $(RUN_DIR) --overwrite
	$(VENV)/bin/dmil evaluate --model $(RUN_DIR) --dataset digits

test: install
	$(PY) -m pytest tests

bench-quick: install
	$(VENV)/bin/dmil bench --quick --jobs 2 --output-dir runs/bench-quick

bench: install
	$(VENV)/bin/dmil bench --jobs 2 --output-dir runs/bench

profile: install
	$(VENV)/bin/dmil profile --output runs/profile.json

clean:
	rm -rf runs build dist *.egg-info
