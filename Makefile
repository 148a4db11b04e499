# The two set-up commands of README.md. Both install what is missing first (scripts/install.sh,
# which also builds the guest agent and the init's helper from guest-agent/ and guest-run/
# when their sources changed).
VENV        := .venv
TEST_ASSETS := $(CURDIR)/.cache/test-assets

.PHONY: run test install lint
run: install
	$(VENV)/bin/vmfleet dev

test:
	scripts/install.sh $(TEST_ASSETS)
	$(MAKE) --no-print-directory lint
	VMFLEET_TEST_ASSETS=$(TEST_ASSETS) $(VENV)/bin/pytest

install:
	scripts/install.sh

lint:
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check schemas gateway worker natsbus cli
	$(VENV)/bin/mypy
	cd guest-agent && test -z "$$(gofmt -l .)" && go vet ./...
