"""DATABASE_URL with several hosts, as operators write it (libpq's form): whatever the host
names, ports and query, asyncpg gets every host with its port, in order, and the rest of the
URL unchanged."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy.engine import make_url

from app.config import normalize_database_url
from app.db.pool import connect_kwargs

names = st.from_regex(r"[a-z][a-z0-9-]{0,20}(\.[a-z][a-z0-9-]{0,10}){0,3}", fullmatch=True)
hosts = st.lists(st.tuples(names, st.none() | st.integers(1, 65535)), min_size=2, max_size=5)


@given(
    hosts=hosts,
    database=st.from_regex(r"[a-z_][a-z0-9_]{0,30}", fullmatch=True),
    ssl=st.sampled_from([None, "require", "verify-full"]),
)
def test_every_host_reaches_asyncpg_in_order(
    hosts: list[tuple[str, int | None]], database: str, ssl: str | None
) -> None:
    netloc = ",".join(name if port is None else f"{name}:{port}" for name, port in hosts)
    query = "target_session_attrs=read-write" + (f"&ssl={ssl}" if ssl else "")
    url = make_url(normalize_database_url(f"postgresql://app:pw@{netloc}/{database}?{query}"))
    kwargs = connect_kwargs(url)
    assert kwargs["host"] == [name for name, _ in hosts]
    assert kwargs["port"] == [5432 if port is None else port for _, port in hosts]
    assert kwargs["database"] == database and kwargs["user"] == "app"
    assert kwargs["password"] == "pw"
    assert kwargs["target_session_attrs"] == "read-write"
    assert kwargs.get("ssl") == ssl


@given(st.from_regex(r"postgresql://[a-z]+@[a-z]+(:[0-9]{1,5})?/[a-z]+", fullmatch=True))
def test_one_host_is_left_as_it_was(raw: str) -> None:
    assert normalize_database_url(raw) == raw.replace("postgresql://", "postgresql+asyncpg://")
