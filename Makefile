# Two entry points for a fresh machine: `make demo` and `make test`.
# Each creates .venv and installs everything it needs (torch pinned in constraints.txt).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
# nothing may silently need a download: the demo and tests use tiny local models
export HF_HUB_OFFLINE := 1

.PHONY: setup demo test test-fast bench clean

# pytest-xdist workers; tests/conftest.py gives each its share of the cores for torch
TEST_WORKERS ?= 2

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	@# an ffmpeg binary: the system's if present, else the static one inside imageio-ffmpeg
	@if command -v ffmpeg >/dev/null 2>&1; then echo "ffmpeg: $$(command -v ffmpeg)"; \
	 else ln -sf "$$($(PY) -c 'import imageio_ffmpeg; print(imageio_ffmpeg.get_ffmpeg_exe())')" $(VENV)/bin/ffmpeg; \
	      echo "ffmpeg: $(VENV)/bin/ffmpeg (imageio-ffmpeg's static build)"; fi
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/mav pipeline

test: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pytest -q -n $(TEST_WORKERS) tests

test-fast: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pytest -q -n $(TEST_WORKERS) -m "not slow and not server" tests

bench: $(STAMP)
	$(PY) bench/ingest.py

clean:
	rm -rf $(VENV) mav-data mav-runs mlflow.db mlartifacts mlruns demo-out
