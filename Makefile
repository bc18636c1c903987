# The two set-up commands of the README. Both install .venv on first use (scripts/setup.sh).
.PHONY: setup demo test setup-min test-min pins lint format

setup: .venv/.setup-done

.venv/.setup-done: requirements.txt constraints.txt scripts/setup.sh scripts/faiss_choice.py
	bash scripts/setup.sh
	touch $@

# The offline demo: tiny model + synthetic pages through train -> mine -> train -> eval -> plots (outputs/demo/).
demo: setup
	bash scripts/demo.sh

# Two test processes (pytest-xdist; most of the time is processes starting, so two help even on 2 cores).
# TEST_WORKERS=0 runs them in this process, one by one.
TEST_WORKERS ?= 2
test: setup
	.venv/bin/python -m pytest -q -n $(TEST_WORKERS) tests

# The floor set: the oldest versions requirements.txt accepts that are tested (constraints-min.txt: transformers
# 5.17, as on the GPU machines), in .venv-min. CI runs it after `make test`; every change keeps it green.
setup-min: .venv-min/.setup-done

.venv-min/.setup-done: requirements.txt constraints-min.txt scripts/setup.sh scripts/faiss_choice.py
	VENV=.venv-min CONSTRAINTS=constraints-min.txt bash scripts/setup.sh
	touch $@

test-min: setup-min
	.venv-min/bin/python -m pytest -q -n $(TEST_WORKERS) tests

# Re-resolve the pinned versions (constraints.txt) from requirements.txt's ranges; then `make test` and commit.
pins:
	bash scripts/refresh_pins.sh

# ruff (ruff.toml; pinned in requirements.txt): lint + format check, as CI runs it; `make format` rewrites in place.
lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

format: setup
	.venv/bin/ruff format .
	.venv/bin/ruff check --fix .
