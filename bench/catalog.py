"""Realistic items for the bench's scale section: names and descriptions drawn from a
vocabulary of 20,000 words with a skewed (Zipf-like) frequency, as product catalogs have (a
few words in a large share of items, most words rare), a product code in every name, prices
and states spread. Seeded in PostgreSQL itself (one INSERT ... SELECT), deterministic.

`terms()` names the searches the bench runs, derived from the same vocabulary: how many items
each matches follows from the distribution, and the bench prints the count it finds."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass

import asyncpg

VOCABULARY_SIZE = 20_000
SKEW = 4  # a word's rank is VOCABULARY_SIZE * random() ** SKEW: rank 0 is the most frequent
# Common catalog words first (the most frequent ranks), then made-up words.
COMMON = [
    "set",
    "pro",
    "kit",
    "max",
    "mini",
    "case",
    "steel",
    "blue",
    "black",
    "white",
    "red",
    "green",
    "cable",
    "pack",
    "light",
    "home",
    "outdoor",
    "wireless",
    "portable",
    "classic",
    "premium",
    "compact",
    "professional",
    "adjustable",
    "stainless",
    "rechargeable",
    "waterproof",
    "heavy",
    "duty",
    "replacement",
    "organic",
    "vintage",
    "deluxe",
]
SYLLABLES = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"] + [
    c + v + e for c in "bdgklmnprst" for v in "aeiou" for e in "lnrst"
]


def vocabulary(size: int = VOCABULARY_SIZE) -> list[str]:
    words = list(COMMON)
    seen = set(words)
    chooser = random.Random(20261204)  # noqa: S311 - a reproducible catalog, not a secret
    while len(words) < size:
        word = "".join(chooser.choice(SYLLABLES) for _ in range(chooser.randint(2, 4)))
        if word not in seen:
            seen.add(word)
            words.append(word)
    return words


# Word picks are lookups in a temporary table of the vocabulary by rank (indexing a 20,000
# element array parameter copies it on every access: 50x slower).
SEED_SQL = """
INSERT INTO items (id, name, description, price, is_active, created_at, updated_at)
SELECT gen_random_uuid(),
       left(initcap(array_to_string(ARRAY(
           SELECT word FROM generate_series(1, 2 + n % 3) AS g
           CROSS JOIN LATERAL (SELECT floor($1 * random() ^ $2)::int + 0 * g AS pick) AS p
           JOIN vocabulary ON rank = pick), ' '))
            || ' ' || upper(substr(md5(n::text), 1, 2)) || '-' || (n * 7919 % 1000003), 200),
       array_to_string(ARRAY(
           SELECT word FROM generate_series(1, 6 + n * 31 % 15) AS g
           CROSS JOIN LATERAL (SELECT floor($1 * random() ^ $2)::int + 0 * g AS pick) AS p
           JOIN vocabulary ON rank = pick), ' '),
       round((1 + random() * 999)::numeric, 2),
       n % 7 <> 0,
       now() - make_interval(secs => n),
       now()
FROM generate_series($3::bigint, $4::bigint) AS n
"""


async def seed(dsn: str, rows: int, *, batch: int = 100_000, connections: int = 2) -> None:
    """`rows` items, the newest first by created_at (one second apart), in batches over a
    few connections (a core each). Then VACUUM ANALYZE."""
    words = vocabulary()
    batches = [(start, min(start + batch - 1, rows)) for start in range(1, rows + 1, batch)]

    async def worker() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(
                "CREATE TEMPORARY TABLE vocabulary (rank int PRIMARY KEY, word text)"
            )
            await conn.executemany("INSERT INTO vocabulary VALUES ($1, $2)", list(enumerate(words)))
            # The trigram indexes take the rows in bulk (their pending list), not one by one.
            await conn.execute("SET gin_pending_list_limit = '1GB'")
            while batches:
                start, end = batches.pop(0)
                await conn.execute(SEED_SQL, len(words), SKEW, start, end)
        finally:
            await conn.close()

    await asyncio.gather(*(worker() for _ in range(connections)))
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SET maintenance_work_mem = '512MB'")
        await conn.execute("VACUUM ANALYZE items")
    finally:
        await conn.close()


@dataclass(frozen=True)
class Term:
    label: str
    q: str


def terms() -> list[Term]:
    """The searches of the scale section: unselective and selective, short and long, one
    that matches nothing, and a product code."""
    words = vocabulary()
    rare = [w for w in words[15_000:] if len(w) >= 8]
    return [
        Term("unselective, short", words[0]),  # 'set': in a large share of items
        Term("unselective, long", "professional"),
        Term("selective, short", next(w for w in words[12_000:] if len(w) == 4)),
        Term("selective, long", rare[0]),
        Term("no match", "qzxv"),
        Term("product code", "-" + str(1234 * 7919 % 1000003)),
    ]
