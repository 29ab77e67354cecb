# The two commands a fresh machine needs: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo demo-quick ablations ablations-quick test bench install browser clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned: nothing later may swap it for another build.
	$(BIN)/pip install "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/pip install -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/fusion-diff demo

demo-quick: $(STAMP)
	$(BIN)/fusion-diff demo --quick

# Issue 18's ablations (regression, no stage 1, sampling, multi-sample scoring) on the demo's data; not part of `demo`.
ablations: $(STAMP)
	$(BIN)/python scripts/ablations.py

ablations-quick: $(STAMP)
	$(BIN)/python scripts/ablations.py --quick

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python scripts/bench_sampling.py
	$(BIN)/python scripts/bench_training.py

# Debian's Chromium for the web page's browser test (Playwright drives it; its own browser download needs the
# internet). Without it that one test is skipped, saying so.
browser:
	@if [ -x /usr/bin/chromium ]; then echo "chromium: /usr/bin/chromium"; else \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update && $$SUDO apt-get install -y chromium; fi

clean:
	rm -rf $(VENV) build *.egg-info
