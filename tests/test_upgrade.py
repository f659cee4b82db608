"""The upgrade to tenancy as a deployment meets it: a database with rows of the previous release,
that release serving (gunicorn, two workers, through PgBouncer) while this release's migration
runs under its load, then this release serving the same rows (expand/contract: the migration
keeps the previous release working; the rows it wrote belong to the default tenant)."""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter

import httpx
import pytest

from app.db.migrations import head_revision
from harness.pgbouncer import MODERN
from harness.postgres import PostgresServer
from harness.releases import BEFORE_TENANCY, ReleaseUnavailable, checked_out, require
from harness.servers import pooled_env, run_cli, serve
from tests.support.app import start_bouncer
from tests.support.skips import missing

pytestmark = [pytest.mark.postgres, pytest.mark.slow]


class Load(threading.Thread):
    """Keyed creates, reads and lists against one server until stopped; every status kept."""

    def __init__(self, base: str) -> None:
        super().__init__(daemon=True)
        self.base = base
        self.statuses: Counter[int] = Counter()
        self.stop = threading.Event()
        self.created: dict[str, str] = {}  # Idempotency-Key -> item id

    def run(self) -> None:
        with httpx.Client(base_url=self.base, timeout=10) as client:
            while not self.stop.is_set():
                key = f"upgrade-{uuid.uuid4().hex[:12]}"
                made = client.post(
                    "/v1/items",
                    json={"name": f"during {key}", "price": 2},
                    headers={"Idempotency-Key": key},
                )
                self.statuses[made.status_code] += 1
                if made.status_code == 201:
                    self.created[key] = made.json()["id"]
                    self.statuses[client.get(f"/v1/items/{made.json()['id']}").status_code] += 1
                self.statuses[client.get("/v1/items", params={"q": "during"}).status_code] += 1


REVISION = "SELECT version_num FROM alembic_version"


def test_the_previous_release_serves_through_the_tenancy_migration(pg: PostgresServer) -> None:
    try:
        require(BEFORE_TENANCY)
    except ReleaseUnavailable as error:
        missing(str(error))
    database = pg.create_database("itemstream_upgrade")
    bouncer = start_bouncer(MODERN, pg)
    try:
        with checked_out(BEFORE_TENANCY) as previous:
            # As the chart runs both releases (production settings, no identity provider).
            env = pooled_env(
                pg,
                bouncer,
                database,
                ENVIRONMENT="production",
                AUTH_ALLOW_UNAUTHENTICATED="true",
                CURSOR_SECRETS="upgrade-cursor-key-0123456789",
            )
            migrated = run_cli("migrate", env=env, cwd=previous)
            assert migrated.returncode == 0, migrated.stdout + migrated.stderr
            old_head = str(pg.fetchval(database, REVISION))
            assert old_head < head_revision(), "the previous release must be older"

            with serve(env, previous) as old:
                # Rows of the previous release, one with a key.
                before = httpx.post(
                    f"{old.base}/v1/items",
                    json={"name": "before the upgrade", "price": 1},
                    headers={"Idempotency-Key": "made-before"},
                )
                assert before.status_code == 201, before.text
                assert "tenant" not in before.json()

                load = Load(old.base)
                load.start()
                time.sleep(1)
                started = time.monotonic()
                upgrade = run_cli("migrate", env=env)  # this release's migration, under load
                took = time.monotonic() - started
                assert upgrade.returncode == 0, upgrade.stdout + upgrade.stderr
                assert pg.fetchval(database, REVISION) == head_revision()
                time.sleep(1)
                # The previous release, on the newer schema: still ready, still writing.
                ready = httpx.get(f"{old.base}/readyz")
                assert ready.status_code == 200, ready.text
                load.stop.set()
                load.join(15)
                print(
                    f"migration {old_head} -> {head_revision()} took {took:.2f}s under load; "
                    f"previous release answered {dict(load.statuses)}"
                )
                errors = [line for line in old.json_lines() if line["level"] == "error"]
                print(*(f"{e['msg']}\n{e.get('exc', '')}" for e in errors), sep="\n")
                assert set(load.statuses) <= {200, 201}, load.statuses
                assert load.statuses[201] > 5

                # This release beside it, on the same rows: everything the previous release
                # wrote is the default tenant's, which is every caller's with auth off.
                with serve(env) as new:
                    item = httpx.get(f"{new.base}/v1/items/{before.json()['id']}")
                    assert item.status_code == 200 and item.json()["tenant"] == "default"
                    replay = httpx.post(
                        f"{new.base}/v1/items",
                        json={"name": "before the upgrade", "price": 1},
                        headers={"Idempotency-Key": "made-before"},
                    )
                    assert replay.headers.get("idempotent-replayed") == "true", replay.text
                    assert replay.json()["id"] == before.json()["id"]
                    key, item_id = next(iter(load.created.items()))
                    during = httpx.post(
                        f"{new.base}/v1/items",
                        json={"name": f"during {key}", "price": 2},
                        headers={"Idempotency-Key": key},
                    )
                    assert during.json()["id"] == item_id, "a key written during the upgrade"
                    listed = httpx.get(f"{new.base}/v1/items", params={"per_page": 100}).json()
                    assert len(listed["data"]) == min(100, 1 + len(load.created))
                    # ... and the previous release reads what this one writes.
                    made = httpx.post(f"{new.base}/v1/items", json={"name": "new", "price": 3})
                    seen = httpx.get(f"{old.base}/v1/items/{made.json()['id']}")
                    assert seen.status_code == 200, seen.text
    finally:
        bouncer.close()
        pg.drop_database(database)
