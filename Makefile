.PHONY: run test lint fmt typecheck check migrate

run:  ## run the service on the embedded SQLite database at http://127.0.0.1:8000
	uv run itemstream serve

test:  ## the whole test suite (installs uv, Python deps and PgBouncer where missing)
	./scripts/test.sh

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
