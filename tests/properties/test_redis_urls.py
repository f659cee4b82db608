"""REDIS_URL naming Sentinels (`redis+sentinel://...`): whatever the hosts, ports, service,
database and credentials, the client built from it asks exactly those Sentinels, in order,
for that service, and carries the credentials; anything else is refused by name at start."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from app.config import SENTINEL_PORT, Settings, env_variable, parse_redis_url
from app.security.redis_client import connect
from app.telemetry.redact import redact

names = st.from_regex(r"[a-z][a-z0-9-]{0,20}(\.[a-z][a-z0-9-]{0,10}){0,3}", fullmatch=True)
sentinels = st.lists(st.tuples(names, st.none() | st.integers(1, 65535)), min_size=1, max_size=5)
secrets = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=20)


@given(
    hosts=sentinels,
    service=st.from_regex(r"[A-Za-z0-9_.-]{1,30}", fullmatch=True),
    db=st.none() | st.integers(0, 15),
    password=st.none() | secrets,
)
async def test_the_client_asks_those_sentinels_for_that_service(
    hosts: list[tuple[str, int | None]], service: str, db: int | None, password: str | None
) -> None:
    netloc = ",".join(name if port is None else f"{name}:{port}" for name, port in hosts)
    userinfo = "" if password is None else f":{quote(password, safe='')}@"
    path = service if db is None else f"{service}/{db}"
    url = f"redis+sentinel://{userinfo}{netloc}/{path}"
    target = parse_redis_url(url)
    assert target is not None
    expected = [(name, SENTINEL_PORT if port is None else port) for name, port in hosts]
    assert list(target.sentinels) == expected
    client = connect(url, 0.05)
    try:
        pool = client.connection_pool
        assert pool.service_name == service  # type: ignore[attr-defined]
        manager = pool.sentinel_manager  # type: ignore[attr-defined]
        asked = [
            (
                s.connection_pool.connection_kwargs["host"],
                s.connection_pool.connection_kwargs["port"],
            )
            for s in manager.sentinels
        ]
        assert asked == expected
        for s in manager.sentinels:  # bounded, and the same credentials
            assert s.connection_pool.connection_kwargs["socket_timeout"] == 0.05
            assert s.connection_pool.connection_kwargs.get("password") == password
        assert pool.connection_kwargs["db"] == (db or 0)
        assert pool.connection_kwargs.get("password") == password
        if password is not None:  # and check-config and the logs never show it
            assert redact(url) == f"redis+sentinel://:***@{netloc}/{path}"
    finally:
        await client.aclose()


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("http://cache:6379", "scheme must be one of"),
        ("redis+sentinel:///itemstream", "at least one Sentinel"),
        ("redis+sentinel://s1:26379", "name the primary's service"),
        ("redis+sentinel://s1:70000/itemstream", "host[:port]"),
        ("redis+sentinel://s1/itemstream/zero", "must be a number"),
    ],
)
def test_a_wrong_redis_url_is_refused_by_name(url: str, says: str) -> None:
    with pytest.raises(ValidationError) as refused:
        Settings(_env_file=None, redis_url=url)
    [error] = refused.value.errors()
    assert env_variable(error["loc"]) == "REDIS_URL"
    assert says in error["msg"]


def test_plain_urls_are_redis_pys_own() -> None:
    for url in ("redis://cache:6379/0", "rediss://:pw@cache:6380/1", "unix:///run/redis.sock"):
        assert parse_redis_url(url) is None


@given(
    st.one_of(
        st.text(),
        st.builds(
            lambda body: f"redis+sentinel://{body}",
            st.text(alphabet=st.sampled_from(list(":/,@[]%?#0123456789abc ")), max_size=40),
        ),
    )
)
def test_any_redis_url_is_accepted_or_refused_by_name(raw: str) -> None:
    """Hostile values: a REDIS_URL is either accepted, and then names a usable target, or
    refused as REDIS_URL with a message; never another exception."""
    errors: list[Any] = []
    try:
        Settings(_env_file=None, redis_url=raw)
    except ValidationError as refused:
        errors = refused.errors()
    if errors:
        assert {env_variable(e["loc"]) for e in errors} == {"REDIS_URL"}
        return
    target = parse_redis_url(raw.strip()) if raw.strip() else None
    if target is not None:
        assert target.service and target.sentinels
        assert all(host and 0 < port < 65536 for host, port in target.sentinels)
