"""Access control and abuse protection against real components: a local OIDC issuer with key
rotation on loopback, real Redis (a throwaway redis-server, so it can be stopped), and
gunicorn with two workers for the shared budget."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from app.config import Settings
from app.db.migrations import migrate
from harness.postgres import PostgresServer
from harness.processes import free_port, stop, wait_for_port, wait_until
from harness.sentinel import redis_server_argv
from harness.servers import clean_env, serve
from tests.support.app import make_settings
from tests.support.http_servers import running_app
from tests.support.identity import (
    AUDIENCE,
    Issuer,
    SigningKey,
    confused_token,
    local_issuer,
    unsigned_token,
)
from tests.support.skips import missing

HS_SECRET = "a-development-secret-of-at-least-32-chars"


@pytest.fixture
async def sqlite_url(tmp_path: Path) -> str:
    url = f"sqlite+aiosqlite:///{tmp_path / 'access.db'}"
    await migrate(make_settings(url).db.app_url)
    return url


@pytest.fixture
async def issuer() -> AsyncIterator[Issuer]:
    async with local_issuer() as running:
        yield running


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def jwt_settings(url: str, issuer: Issuer, **extra: Any) -> Settings:
    return make_settings(
        url,
        auth_mode="jwt",
        auth_issuer=issuer.base,
        auth_audience=AUDIENCE,
        auth_jwks_min_refresh_seconds=0,
        mock_token_delay=0,
        **extra,
    )


# --- tokens ---------------------------------------------------------------------------------


async def test_tokens_right_rotated_wrong_expired_audience_none_confusion(
    sqlite_url: str, issuer: Issuer
) -> None:
    original = issuer.keys[0]
    settings = jwt_settings(sqlite_url, issuer)
    async with running_app(settings) as base, httpx.AsyncClient(base_url=base) as client:
        # The right key: reads and writes; the creator is recorded.
        good = issuer.token(sub="alice")
        assert (await client.get("/v1/items", headers=bearer(good))).status_code == 200
        created = await client.post(
            "/v1/items", json={"name": "a", "price": 1}, headers=bearer(good)
        )
        assert created.status_code == 201
        assert created.json()["created_by"] == "alice"

        # No token: 401 with a Bearer challenge, as problem+json.
        anonymous = await client.get("/v1/items")
        assert anonymous.status_code == 401
        assert anonymous.headers["www-authenticate"] == 'Bearer realm="itemstream"'
        assert anonymous.headers["content-type"] == "application/problem+json"

        # Rotation: a new key appears at the issuer; a token signed with it works at once.
        rotated = SigningKey.ec()
        issuer.keys.append(rotated)
        fetches = issuer.jwks_fetches
        token = issuer.token(rotated, sub="bob")
        assert (await client.get("/v1/items", headers=bearer(token))).status_code == 200
        assert issuer.jwks_fetches == fetches + 1
        # ... and once the old key is retired, its tokens stop working after a refresh.
        issuer.keys.remove(original)

        refused = {
            # Same kid as a real key, signed by another key of the same type.
            "a wrong key under a known kid": issuer.token(SigningKey.ec(), kid=rotated.kid),
            "an unknown kid": issuer.token(SigningKey.rsa()),
            "expired": issuer.token(rotated, expires_in=-120),
            "another audience": issuer.token(rotated, audience="someone-else"),
            "alg none": unsigned_token(issuer, rotated.kid),
            "HS256 with the public key": confused_token(issuer, rotated),
            "garbage": "not.a.jwt",
        }
        for case, token in refused.items():
            response = await client.get("/v1/items", headers=bearer(token))
            assert response.status_code == 401, case
            challenge = response.headers["www-authenticate"]
            assert 'error="invalid_token"' in challenge, (case, challenge)
        expired = await client.get("/v1/items", headers=bearer(refused["expired"]))
        assert "expired" in expired.json()["detail"]
        # The retired key: its kid is unknown after the refresh triggered above.
        retired = issuer.token(original)
        assert (await client.get("/v1/items", headers=bearer(retired))).status_code == 401


async def test_an_identity_provider_outage_is_503_never_401(
    sqlite_url: str, issuer: Issuer
) -> None:
    """While the issuer's keys cannot be fetched, a token signed with a key the service has
    not seen may well be good (rotated in during the outage): 503 with Retry-After, so the
    client retries instead of dropping it. Known keys keep working; the outage over, the new
    key works at once."""
    settings = jwt_settings(sqlite_url, issuer)
    async with running_app(settings) as base, httpx.AsyncClient(base_url=base) as client:
        assert (await client.get("/v1/items", headers=bearer(issuer.token()))).status_code == 200
        issuer.down = True
        rotated = SigningKey.rsa()
        issuer.keys.append(rotated)
        for _ in range(3):  # the first refused fetch, and the back-off window after it
            unknown = await client.get("/v1/items", headers=bearer(issuer.token(rotated)))
            assert unknown.status_code == 503, unknown.text
            assert unknown.headers["retry-after"] == "5"
            assert "identity provider" in unknown.json()["detail"]
        known = await client.get("/v1/items", headers=bearer(issuer.token()))
        assert known.status_code == 200, "cached keys keep serving"
        forged = await client.get("/v1/items", headers=bearer(confused_token(issuer, rotated)))
        assert forged.status_code == 401, "a token no key could verify is still refused"
        issuer.down = False
        back = await client.get("/v1/items", headers=bearer(issuer.token(rotated)))
        assert back.status_code == 200, back.text


async def test_a_token_for_another_audience_is_refused_and_audience_is_required(
    sqlite_url: str, issuer: Issuer
) -> None:
    with pytest.raises(ValueError, match="AUTH_AUDIENCE"):
        make_settings(sqlite_url, auth_mode="jwt", auth_issuer=issuer.base)
    settings = jwt_settings(sqlite_url, issuer)
    async with running_app(settings) as base, httpx.AsyncClient(base_url=base) as client:
        other = issuer.token(audience="billing-service")
        refused = await client.get("/v1/items", headers=bearer(other))
        assert refused.status_code == 401
        assert "audience" in refused.json()["detail"]


async def test_scopes_and_anonymous_reads(sqlite_url: str, issuer: Issuer) -> None:
    settings = jwt_settings(sqlite_url, issuer, auth_anonymous_read=True)
    async with running_app(settings) as base, httpx.AsyncClient(base_url=base) as client:
        reader = issuer.token(scope="items:read")
        write = await client.post(
            "/v1/items", json={"name": "a", "price": 1}, headers=bearer(reader)
        )
        assert write.status_code == 403
        assert (
            'error="insufficient_scope", scope="items:write"' in write.headers["www-authenticate"]
        )
        chat = await client.post(
            "/v1/chat/completions",
            json={"model": "itemstream-mock", "messages": [{"role": "user", "content": "hi"}]},
            headers=bearer(reader),
        )
        assert chat.status_code == 403
        assert chat.json()["error"]["code"] == "insufficient_scope"  # OpenAI's error shape
        # Anonymous reads are allowed by the setting; anonymous writes are not.
        assert (await client.get("/v1/items")).status_code == 200
        assert (await client.post("/v1/items", json={"name": "a", "price": 1})).status_code == 401
        # Generations record the caller.
        gen = issuer.token(sub="carol", scope="generate items:read")
        done = await client.post(
            "/v1/chat/completions",
            json={"model": "itemstream-mock", "messages": [{"role": "user", "content": "hi"}]},
            headers=bearer(gen),
        )
        generation_id = str(uuid.UUID(done.json()["id"].removeprefix("chatcmpl-")))
        record = await client.get(f"/v1/generations/{generation_id}", headers=bearer(gen))
        assert record.json()["principal"] == "carol"


def test_hs256_is_refused_in_production() -> None:
    with pytest.raises(ValueError, match="hs256"):
        make_settings(
            "postgresql+asyncpg://u@h/db",
            environment="production",
            migration_database_url="postgresql+asyncpg://u@h/db",
            auth_mode="hs256",
            auth_hs256_secret=HS_SECRET,
        )
    with pytest.raises(ValueError, match="AUTH_ISSUER"):
        make_settings("sqlite+aiosqlite:///x.db", auth_mode="jwt")


# --- rate limits ----------------------------------------------------------------------------


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    """A throwaway Redis (the shared one on 6379 must not be stopped)."""
    binary = shutil.which("redis-server")
    if binary is None:
        missing("redis-server not installed")
    assert binary is not None
    port = free_port()
    proc = subprocess.Popen(
        redis_server_argv(port, tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, 10, proc)
        yield port, proc
    finally:
        stop(proc)


def hs_token(sub: str, scope: str = "items:read items:write generate") -> str:
    return jwt.encode(
        {"sub": sub, "exp": 2_000_000_000, "scope": scope}, HS_SECRET, algorithm="HS256"
    )


def limited(url: str, redis_port: int | None, **extra: Any) -> Settings:
    return make_settings(
        url,
        auth_mode="hs256",
        auth_hs256_secret=HS_SECRET,
        rate_limit_enabled=True,
        redis_url=f"redis://127.0.0.1:{redis_port}/0" if redis_port else None,
        **extra,
    )


@pytest.mark.slow
@pytest.mark.postgres
def test_shared_budget_holds_exactly_across_two_gunicorn_workers(
    tmp_path: Path, pg: PostgresServer, schema_db: str
) -> None:
    """Against the machine's Redis on 6379, shared by both workers: 30 of 50 get through."""
    import redis as redis_sync

    try:
        redis_sync.Redis(host="127.0.0.1", port=6379, socket_timeout=1).ping()
    except redis_sync.RedisError:
        missing("no Redis on 127.0.0.1:6379")
    sub = f"budget-{uuid.uuid4().hex}"  # its own buckets on a shared Redis
    env = clean_env(
        # PostgreSQL: the embedded SQLite default always runs a single worker.
        DATABASE_URL=pg.url(schema_db).render_as_string(hide_password=False),
        WEB_CONCURRENCY="2",
        AUTH_MODE="hs256",
        AUTH_HS256_SECRET=HS_SECRET,
        RATE_LIMIT_ENABLED="true",
        REDIS_URL="redis://127.0.0.1:6379/0",
        RATE_LIMIT_REQUESTS="30",
        RATE_LIMIT_WINDOW_SECONDS="3600",
        # Exactness is the point here, not the timeout (test_slow_clients has that): a burst of
        # 50 new connections can keep a worker's loop busy past the default 50 ms, and a late
        # answer fails open (CI once served 42 of 50).
        RATE_LIMIT_REDIS_TIMEOUT="1",
    )
    subjects: list[str] = []
    with serve(env, tmp_path) as server:
        assert wait_until(lambda: server.output().count("Application startup complete") == 2, 30)

        async def burst(token: str) -> list[httpx.Response]:
            # A new connection per request, so the kernel spreads them over both workers.
            limits = httpx.Limits(max_connections=50, max_keepalive_connections=0)
            async with httpx.AsyncClient(base_url=server.base, limits=limits) as client:
                return list(
                    await asyncio.gather(
                        *(client.get("/v1/items", headers=bearer(token)) for _ in range(50))
                    )
                )

        def served_by(subject: str) -> set[int]:
            return {
                line["pid"]
                for line in server.json_lines()
                if line.get("logger") == "itemstream.access"
                and line["http"]["route"] == "/v1/items"
                and line["http"].get("principal") == subject
            }

        # The kernel picks the accepting worker: a burst may land on one. Each round is a new
        # caller (a fresh budget) until one was served by both workers.
        for round_ in range(5):
            subject = f"{sub}-{round_}"
            subjects.append(subject)
            token = hs_token(subject)
            responses = asyncio.run(burst(token))
            codes = [r.status_code for r in responses]
            assert codes.count(200) == 30 and codes.count(429) == 20, codes
            refused = next(r for r in responses if r.status_code == 429)
            assert int(refused.headers["retry-after"]) >= 1
            assert refused.headers["ratelimit-policy"] == '"requests";q=30;w=3600'
            assert refused.headers["ratelimit"].startswith('"requests";r=0;')
            if len(served_by(subject)) == 2:
                break
        # Both workers answered, yet only 30 got through: one budget, not one per worker.
        assert len(served_by(subject)) == 2, "both workers should have served one caller"
        output = server.output()
        assert token not in output and token.split(".")[2] not in output, "a token was logged"
    for subject in subjects:
        redis_sync.Redis(host="127.0.0.1", port=6379).delete(
            f"itemstream:rl:requests:sub:{subject}"
        )


@pytest.mark.parametrize("mode", ["open", "closed"])
async def test_redis_stopped_mid_test_follows_the_fail_mode(
    sqlite_url: str, redis_server: tuple[int, subprocess.Popen[bytes]], mode: str
) -> None:
    port, proc = redis_server
    settings = limited(sqlite_url, port, rate_limit_fail_mode=mode)
    async with running_app(settings) as base, httpx.AsyncClient(base_url=base) as client:
        token = hs_token("dave")
        first = await client.get("/v1/items", headers=bearer(token))
        assert first.status_code == 200
        stop(proc)  # Redis goes away
        during = await client.get("/v1/items", headers=bearer(token))
        if mode == "open":
            assert during.status_code == 200
            metrics = (await client.get("/metrics")).text
            assert "itemstream_ratelimit_backend_errors_total 1.0" in metrics
        else:
            assert during.status_code == 503
            assert during.headers["retry-after"] == "2"


@pytest.mark.parametrize("with_redis", [True, False])
async def test_a_flood_of_refused_tokens_is_429_after_its_budget(
    sqlite_url: str, redis_server: tuple[int, subprocess.Popen[bytes]], with_redis: bool
) -> None:
    """Refusals (no token, a bad token, a missing scope) count against the client address's own
    budget; past it they are 429, while a good token from the same address is served."""
    port, _ = redis_server
    settings = limited(sqlite_url, port if with_redis else None, rate_limit_auth_failures=5)
    async with running_app(settings) as base, httpx.AsyncClient(base_url=base) as client:
        refusals = [
            await client.get("/v1/items"),
            await client.get("/v1/items", headers=bearer("not.a.token")),
            await client.get("/v1/items", headers=bearer(hs_token("eve", scope="generate"))),
            await client.get("/v1/items", headers=bearer("still.not.one")),
            await client.get("/v1/items", headers=bearer(hs_token("eve", scope="nothing"))),
        ]
        assert [r.status_code for r in refusals] == [401, 401, 403, 401, 403]
        flood = await client.get("/v1/items", headers=bearer("yet.another.bad"))
        assert flood.status_code == 429, flood.text
        assert int(flood.headers["retry-after"]) >= 1
        assert flood.headers["ratelimit-policy"] == '"auth_failures";q=5;w=60'
        good = await client.get("/v1/items", headers=bearer(hs_token("grace")))
        assert good.status_code == 200, "a valid caller behind the same address is served"


async def test_stream_and_token_quotas(
    sqlite_url: str, redis_server: tuple[int, subprocess.Popen[bytes]]
) -> None:
    port, _ = redis_server
    settings = limited(
        sqlite_url,
        port,
        rate_limit_streams=1,
        rate_limit_tokens=10,
        rate_limit_tokens_window_seconds=3600,
        mock_tokens=12,
        mock_token_delay=0.05,
    )
    body = {
        "model": "itemstream-mock",
        "stream": True,
        "messages": [{"role": "user", "content": "hi"}],
    }
    async with running_app(settings) as base, httpx.AsyncClient(base_url=base) as client:
        token = bearer(hs_token("erin"))
        async with client.stream("POST", "/v1/chat/completions", json=body, headers=token) as held:
            assert held.status_code == 200
            second = await client.post("/v1/chat/completions", json=body, headers=token)
            assert second.status_code == 429, second.text
            assert "streams open" in second.json()["error"]["message"]
            await held.aread()
        # 12 tokens were charged against a budget of 10: the next stream is refused.
        over = await client.post("/v1/chat/completions", json=body, headers=token)
        assert over.status_code == 429
        assert int(over.headers["retry-after"]) >= 1
        assert over.headers["ratelimit-policy"] == '"tokens";q=10;w=3600'
        # Another caller has their own budget.
        other = await client.post(
            "/v1/chat/completions", json=body, headers=bearer(hs_token("frank"))
        )
        assert other.status_code == 200


# --- HTTP surface ---------------------------------------------------------------------------


async def test_security_headers_trusted_hosts_and_offline_docs(sqlite_url: str) -> None:
    settings = make_settings(sqlite_url, allowed_hosts=["api.example.com", "127.0.0.1"])
    async with running_app(settings) as base, httpx.AsyncClient(base_url=base) as client:
        response = await client.get("/v1/items")
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["x-frame-options"] == "DENY"
        assert "default-src 'none'" in response.headers["content-security-policy"]
        docs = await client.get("/docs")
        assert docs.status_code == 200
        assert "cdn.jsdelivr.net" not in docs.text and "unpkg.com" not in docs.text
        assert "/static/docs/swagger-ui-bundle.js" in docs.text
        asset = await client.get("/static/docs/swagger-ui-bundle.js")
        assert asset.status_code == 200 and "SwaggerUIBundle" in asset.text[:2000]
        redoc = await client.get("/redoc")
        assert "/static/docs/redoc.standalone.js" in redoc.text
        evil = await client.get("/v1/items", headers={"Host": "evil.example.net"})
        assert evil.status_code == 400
