# model-audit: `make demo` and `make test` set up .venv themselves (Python 3.11 + pip).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
WORKDIR ?= audit-workdir

.PHONY: demo test test-fast lint bench ui clean

# tests/browser drive Debian's chromium through its chromium-driver. Installed with apt-get when
# missing and this user may (root, or passwordless sudo); otherwise nothing is installed, make goes
# on, and those tests skip saying why.
APT_CHROMIUM := DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver
INSTALL_CHROMIUM := \
	if command -v chromedriver >/dev/null 2>&1 && command -v chromium >/dev/null 2>&1; then :; \
	elif ! command -v apt-get >/dev/null 2>&1; then echo "no apt-get: browser tests will skip (no chromium)"; \
	elif [ "$$(id -u)" = 0 ]; then sh -c '$(APT_CHROMIUM) || { apt-get update -qq && $(APT_CHROMIUM); }' \
		|| echo "apt-get could not install chromium: browser tests will skip"; \
	elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then \
		sudo -n sh -c '$(APT_CHROMIUM) || { apt-get update -qq && $(APT_CHROMIUM); }' \
		|| echo "apt-get could not install chromium: browser tests will skip"; \
	else echo "not root and no passwordless sudo: browser tests will skip (apt-get install chromium chromium-driver)"; fi

# tests/deploy/test_team.py starts PostgreSQL 15 (initdb, pg_ctl; Debian's `postgresql`). Installed
# the same way when missing; where it cannot be, that test skips and says why.
APT_POSTGRES := DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql
INSTALL_POSTGRES := \
	if command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then :; \
	elif ! command -v apt-get >/dev/null 2>&1; then echo "no apt-get: the team-setup test will skip (no PostgreSQL)"; \
	elif [ "$$(id -u)" = 0 ]; then sh -c '$(APT_POSTGRES) || { apt-get update -qq && $(APT_POSTGRES); }' \
		|| echo "apt-get could not install postgresql: the team-setup test will skip"; \
	elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then \
		sudo -n sh -c '$(APT_POSTGRES) || { apt-get update -qq && $(APT_POSTGRES); }' \
		|| echo "apt-get could not install postgresql: the team-setup test will skip"; \
	else echo "not root and no passwordless sudo: the team-setup test will skip (apt-get install postgresql)"; fi

# torch/torchvision are pinned to the releases that pip installs from this machine's disk
# (other versions download several GB); installed first so the resolver never looks elsewhere.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	-@$(INSTALL_CHROMIUM)
	-@$(INSTALL_POSTGRES)
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/model-audit demo --workdir $(WORKDIR)

# Two pytest-xdist workers: much of the suite waits on real servers starting (MLflow, Prefect,
# uvicorn), which overlaps well on 2 cores; the demo-reading tests share one worker (tests/conftest.py).
test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadgroup

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check audit flows registry_hooks deploy tests bench

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[bench]"
	$(BIN)/python bench/correction.py

ui: $(STAMP)
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(abspath $(WORKDIR))/mlflow.db \
		--default-artifact-root file://$(abspath $(WORKDIR))/mlruns --port 5000

clean:
	rm -rf $(WORKDIR)
