# The two set-up commands of the README. Both install .venv on first use (scripts/setup.sh).
.PHONY: setup demo test pins

setup: .venv/.setup-done

.venv/.setup-done: requirements.txt constraints.txt scripts/setup.sh
	bash scripts/setup.sh
	touch $@

# The offline demo: tiny model + synthetic pages through train -> mine -> train -> eval -> plots (outputs/demo/).
demo: setup
	bash scripts/demo.sh

# Two test processes (pytest-xdist): 8-8.5 min on a 2-core machine, ~11.5 one by one. TEST_WORKERS=0 runs them in
# this process, one by one.
TEST_WORKERS ?= 2
test: setup
	.venv/bin/python -m pytest -q -n $(TEST_WORKERS) tests

# Re-resolve the pinned versions (constraints.txt) from requirements.txt's ranges; then `make test` and commit.
pins:
	bash scripts/refresh_pins.sh
