.PHONY: run test bench lint fmt typecheck check migrate

run:  ## run the service on the embedded SQLite database at http://127.0.0.1:8000
	uv run itemstream serve

test:  ## the whole test suite (installs uv, Python deps and PgBouncer where missing)
	./scripts/test.sh

bench:  ## benchmark: the service vs the raw-ASGI limit and the common FastAPI pattern (~12 min)
	./scripts/bench.sh

lint:
	uv run ruff check .
	uv run ruff format --check .

fmt:
	uv run ruff check --fix .
	uv run ruff format .

typecheck:
	uv run mypy

check: lint typecheck

migrate:
	uv run itemstream migrate
