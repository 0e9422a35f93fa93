# Two commands are the whole set-up: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
OUT ?= out/demo

.PHONY: demo test lint venv clean reference-models browser

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[dev,nuscenes,captum]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m fusionlens.demo --out $(OUT)

# the camera trunk and the tiny reference checkpoints later benchmarks reuse (out/checkpoints/), seeds 1-2 of the
# camera-radar / camera-LiDAR models and their single-modality partners; long: ~2-3 h on 2 CPU cores
reference-models: $(STAMP)
	nice -n 10 $(PY) benchmarks/train_reference.py --steps 250 --train-size 512 --val-size 128 --pretrained \
		--extra-seeds 1,2

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# the audit report's browser test drives Debian's chromium through chromium-driver; installed once when missing
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
		$(SUDO) apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver; }

test: $(STAMP) browser
	$(VENV)/bin/ruff check .
	FUSIONLENS_REQUIRE_BROWSER=1 OMP_NUM_THREADS=1 $(PY) -m pytest -n 2 --dist loadfile

clean:
	rm -rf $(VENV) out .pytest_cache
