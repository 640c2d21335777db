# Two commands on a fresh machine: `make serve` and `make test`. Both bootstrap .venv first.
#
#   make serve ARGS="--model /path/to/hf-dir"     extra engine-serve arguments
#   make test PYTEST_ARGS="tests/engine -x"        extra pytest arguments

VENV ?= .venv
PY := $(VENV)/bin/python
# Pinned: lint rules change between buf releases, and CI must judge what developers see.
BUF_VERSION ?= 1.75.0
BUF := .ci/node/node_modules/.bin/buf
# Named after the version, so changing BUF_VERSION reinstalls.
BUF_STAMP := .ci/node/.buf-$(BUF_VERSION)
ARGS ?=
PYTEST_ARGS ?=
# pytest-xdist workers; modules stay whole on one worker (--dist loadfile), so a module's
# servers start once; modules sharing a server run on one worker, longest first
# (tests/suite_schedule.py). Most of an end-to-end test's time is a server process starting
# or answering, so two workers keep both cores of a 2-core machine busy. TEST_WORKERS=0: one
# process (what a debugger or `-x` on one failing test wants).
TEST_WORKERS ?= 2
PYTEST_WORKERS := $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

.PHONY: bootstrap serve test protos lock lint-proto check

bootstrap:
	@scripts/bootstrap

serve: bootstrap
	$(VENV)/bin/engine-serve $(ARGS)

test: bootstrap
	$(PY) -m pytest -q $(PYTEST_WORKERS) $(PYTEST_ARGS)

# The unit tier: no real servers (e2e), soaks (slow) or generated-input runs (fuzz).
.PHONY: test-fast
test-fast: bootstrap
	$(PY) -m pytest -q $(PYTEST_WORKERS) -m "not e2e and not slow and not fuzz" $(PYTEST_ARGS)

protos: bootstrap
	$(PY) scripts/gen_protos.py

# Re-resolve every dependency to its newest allowed release into constraints.txt (which
# bootstrap installs from); run `make check test` before committing the new file.
lock:
	@scripts/lock

# buf comes from npm into a git-ignored local prefix: no global install, one copy per checkout.
$(BUF_STAMP):
	@command -v npm >/dev/null 2>&1 || { echo "npm is required for buf (make lint-proto)"; exit 1; }
	npm install --no-save --no-audit --no-fund --silent --prefix .ci/node @bufbuild/buf@$(BUF_VERSION)
	@touch $@

# buf.yaml sits at the repo root (module path `proto`), so buf runs from here.
lint-proto: $(BUF_STAMP)
	$(BUF) lint
	@echo "buf lint: ok"

check: bootstrap $(BUF_STAMP)
	$(PY) scripts/gen_protos.py --check
	$(BUF) lint
	@echo "buf lint: ok"
