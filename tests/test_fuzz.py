"""A schema-driven fuzzer (Schemathesis, from PyPI) against the service as users run it
(`itemstream serve`: gunicorn, uvicorn workers), on SQLite and on PostgreSQL through PgBouncer:
every operation, every phase (examples, coverage, fuzzing, stateful links), every check
(server errors, response conformance, schema-valid requests rejected, schema-violating
requests accepted, undeclared methods). The exceptions in tests/fuzz/schemathesis.toml name
their reasons; anything else fails the test."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from harness.pgbouncer import MODERN
from harness.postgres import PostgresServer
from harness.servers import ROOT, clean_env, pooled_env, serve
from tests.support.app import start_bouncer

CONFIG = ROOT / "tests" / "fuzz" / "schemathesis.toml"
SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")


def fuzz(base: str, tmp_path: Path) -> str:
    done = subprocess.run(
        [
            str(SCHEMATHESIS),
            "--config-file",
            str(CONFIG),
            "run",
            f"{base}/openapi.json",
            "--generation-database",
            "none",
            "--max-failures",
            "20",
        ],
        cwd=tmp_path,  # its cache and reports stay out of the checkout
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    output = done.stdout + done.stderr
    (tmp_path / "schemathesis.out").write_text(output)
    # The findings, each line cut short (the fuzzer's request bodies can be kilobytes).
    findings = output[output.find("FAILURES") : output.find("SUMMARY") + 600]
    report = "\n".join(line[:400] for line in findings.splitlines())
    counts = re.search(r"(\d+) generated, (\d+) passed", output)
    print(counts.group(0) if counts else output[-2000:])
    assert done.returncode == 0, report
    assert "No issues found" in output, report
    assert counts and counts.group(1) == counts.group(2), report
    assert int(counts.group(1)) > 500, "the fuzzer ran too few cases to mean anything"
    # Validation-mismatch and missing-coverage notes come as warnings: none may appear.
    assert not re.search(r"(?im)^\s*(⚠️|warnings?:)", output), output[-8000:]
    operations = re.search(r"Selected: (\d+)/(\d+)\s+Tested: (\d+)", output)
    assert operations and len(set(operations.groups())) == 1, "every operation is fuzzed"
    return output


@pytest.mark.slow
def test_fuzz_sqlite(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'fuzz.db'}"
    with serve(clean_env(DATABASE_URL=url, ENVIRONMENT="development")) as server:
        fuzz(server.base, tmp_path)
        assert "Traceback" not in server.output(), server.output()[-4000:]


@pytest.mark.slow
@pytest.mark.postgres
def test_fuzz_postgres_through_pgbouncer(pg: PostgresServer, tmp_path: Path) -> None:
    database = pg.create_database()
    bouncer = start_bouncer(MODERN, pg)
    try:
        env = pooled_env(pg, bouncer, database, ENVIRONMENT="development")
        with serve(env) as server:
            fuzz(server.base, tmp_path)
            assert "Traceback" not in server.output(), server.output()[-4000:]
    finally:
        bouncer.close()
        pg.drop_database(database)
