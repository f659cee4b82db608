"""Logs, metrics and traces. Everything is set up per worker process, after the fork."""
