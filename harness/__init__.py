"""The local infrastructure that tests, `make bench` and `make stack` run: throwaway PostgreSQL
clusters, PgBouncer (old and new), the service as a process, free ports and waiting. No
pytest here: the tests' skip-or-fail rule lives in tests/support/skips.py."""
