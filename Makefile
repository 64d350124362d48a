# The README's two commands: `make serve` and `make test`. Both set up .venv first.
VENV ?= .venv
STORE ?= demo/store
HOST ?= 127.0.0.1
PORT ?= 8000
export MAGE_CACHE_DIR ?= $(CURDIR)/.cache
export HF_HUB_OFFLINE = 1
export TRANSFORMERS_OFFLINE = 1

.PHONY: setup serve test lint bench image

setup:
	@VENV=$(VENV) scripts/setup.sh

serve: setup
	$(VENV)/bin/mage serve --store $(STORE) --host $(HOST) --port $(PORT)

# pytest exits 5 when it collects no test: that is a failure here too, said plainly.
test: setup
	@$(VENV)/bin/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "no tests were collected" >&2; fi; exit $$rc

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: setup
	$(VENV)/bin/python benchmarks/throughput.py --store $(STORE)

# The CPU server image mage-server:cpu, offline where need be (scripts/build_image.sh):
# BASE_IMAGE=python:3.11-slim for Docker Hub's base, TORCH_WHEELS=<folder> for a local wheel.
image:
	@scripts/build_image.sh
