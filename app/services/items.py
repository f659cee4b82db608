"""Item use cases: create (idempotent), read, list, replace, patch, soft/hard delete, restore."""

from __future__ import annotations

import base64
import binascii
import builtins
import hashlib
import hmac
import json
from collections.abc import Callable, Collection, Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import partial
from typing import Any, Literal, get_args, get_type_hints
from uuid import UUID

from app.config import DEVELOPMENT_CURSOR_SECRET
from app.db.engine import Database
from app.db.items import ItemRepository, Plan
from app.domain.errors import (
    IdempotencyKeyInProgress,
    IdempotencyKeyReused,
    InvalidCursor,
    InvalidQuery,
    NotFound,
    PreconditionFailed,
    PreconditionRequired,
)
from app.domain.ids import uuid7
from app.domain.models import Item, ItemFields, ItemFilter, ItemPage, Position, Sort
from app.domain.ports import Writer
from app.domain.principal import Principal
from app.services.admission import NotQuick, QueryGate

ExportFormat = Literal["ndjson", "csv"]
# What clients may change: the fields of ItemFields (derived, so a field added there per
# CONTRIBUTING's recipe is accepted by PATCH without an edit here).
WRITABLE_FIELDS = frozenset(field.name for field in fields(ItemFields))


@dataclass(frozen=True, slots=True)
class ItemPolicy:
    idempotency_ttl: timedelta = timedelta(hours=24)
    require_if_match: bool = False
    export_max_seconds: float = 3600.0
    default_page_size: int = 20
    max_page_size: int = 100
    # Keys that sign keyset cursors: the first signs, any verifies (rotation).
    cursor_keys: tuple[bytes, ...] = (DEVELOPMENT_CURSOR_SECRET.encode(),)
    max_offset: int = 10_000
    list_window: int = 1000
    expensive: QueryGate = field(default_factory=QueryGate)


@dataclass(frozen=True, slots=True)
class Created:
    item: Item
    replayed: bool = False


def _now() -> datetime:
    return datetime.now(UTC)


class ItemService:
    """Every use case takes the caller: whatever it reads or writes is confined to the
    caller's tenant in the query itself (an administrator's reaches every tenant), and
    another tenant's item is not found, exactly as one that does not exist."""

    def __init__(self, db: Database, policy: ItemPolicy | None = None) -> None:
        self._db = db
        self._policy = policy or ItemPolicy()

    # --- create ---------------------------------------------------------------------------

    async def create(
        self, caller: Principal, fields: ItemFields, idempotency_key: str | None = None
    ) -> Created:
        """Create an item in the caller's tenant. With a key (one namespace per tenant), a
        retry returns the first result and stores nothing new; the same key with a different
        body is refused."""
        now = _now()
        values = {
            **asdict(fields),
            "id": uuid7(),
            "created_at": now,
            "updated_at": now,
            "tenant": caller.tenant,
        }
        if caller.author is not None:
            values["created_by"] = caller.author
        if idempotency_key is None:  # one INSERT: atomic by itself, one round trip
            async with self._db.write_one() as session:
                return Created(await ItemRepository(session).insert(values))
        tenant = caller.tenant
        async with self._db.transaction() as session:
            repo = ItemRepository(session)
            fingerprint = _fingerprint(fields)
            expired_before = now - self._policy.idempotency_ttl
            if await repo.claim_key(tenant, idempotency_key, fingerprint, now, expired_before):
                item = await repo.insert(values)
                await repo.complete_key(tenant, idempotency_key, 201, _snapshot(item), item.id)
                return Created(item)
            stored = await repo.get_key(tenant, idempotency_key)
        if stored is None:  # expired and purged between the two statements: a fresh attempt
            return await self.create(caller, fields, idempotency_key)
        if stored.request_hash != fingerprint:
            raise IdempotencyKeyReused(
                "this Idempotency-Key was already used with a different request body"
            )
        if stored.response_body is None:
            raise IdempotencyKeyInProgress("a request with this Idempotency-Key is in progress")
        return Created(_from_snapshot(stored.response_body), replayed=True)

    # --- export ---------------------------------------------------------------------------

    async def export(
        self, caller: Principal, filters: ItemFilter, sort: Sort, fmt: ExportFormat, write: Writer
    ) -> int:
        """Stream every matching item to `write` (NDJSON or CSV) from one snapshot of the
        table, in constant memory; returns the number of rows. If `write` raises or the caller
        is cancelled, the query stops and nothing is left running."""
        async with self._db.stream() as session:
            return await ItemRepository(session).export(
                filters,
                sort,
                fmt,
                write,
                tenant=caller.reach,
                max_seconds=self._policy.export_max_seconds,
            )

    # --- read -----------------------------------------------------------------------------

    async def get(self, caller: Principal, item_id: UUID, *, include_deleted: bool = False) -> Item:
        async with self._db.read() as session:
            item = await ItemRepository(session).get(
                item_id, tenant=caller.reach, include_deleted=include_deleted
            )
        if item is None:
            raise NotFound(f"item {item_id} not found")
        return item

    async def list(
        self,
        caller: Principal,
        filters: ItemFilter,
        sort: Sort,
        *,
        per_page: int | None = None,
        page: int | None = None,
        cursor: str | None = None,
        include_total: bool = False,
    ) -> ItemPage:
        """Offset pages or keyset pages (cursor, stable under inserts); both return next_cursor
        when more rows follow. The total costs a COUNT over every matching row, so it is only
        computed when asked for (free on the last page)."""
        policy = self._policy
        per_page = per_page or policy.default_page_size
        if per_page > policy.max_page_size:
            raise InvalidQuery(f"per_page must be at most {policy.max_page_size}", "per_page")
        if cursor is not None:
            page = None  # a cursor says where the page starts: it wins over a page number
        cursors = _Cursors(policy.cursor_keys, filters, sort, caller.reach)
        after = cursors.decode(cursor) if cursor is not None else None
        offset = 0 if page is None else (page - 1) * per_page
        if offset + per_page > policy.max_offset:
            raise InvalidQuery(
                f"page numbers reach the first {policy.max_offset} items; "
                "follow next_cursor to go further",
                "page",
            )
        # A page may take several queries and a turn at the expensive-query gate: all of
        # them within one DB_REQUEST_TIMEOUT.
        async with self._db.one_bound():
            rows = await self._page(caller, filters, sort, per_page + 1, offset, after)
            total = None
            if include_total:
                if cursor is None and len(rows) <= per_page and (rows or offset == 0):
                    total = offset + len(rows)  # on the last page: no count query needed
                else:
                    async with (
                        policy.expensive.admit("the total", "include_total"),
                        self._db.transaction() as session,
                    ):
                        total = await ItemRepository(session).count(
                            filters, tenant=caller.reach, one_core=True
                        )
        has_more = len(rows) > per_page
        rows = rows[:per_page]
        next_cursor = cursors.encode(rows[-1]) if has_more else None
        return ItemPage(
            items=rows,
            per_page=per_page,
            page=None if cursor is not None else (page or 1),
            total=total,
            next_cursor=next_cursor,
        )

    async def _page(
        self,
        caller: Principal,
        filters: ItemFilter,
        sort: Sort,
        limit: int,
        offset: int,
        after: Position | None,
    ) -> builtins.list[Item]:
        """A page by the cheapest plan that answers it exactly, each bounded: the sort
        index's walk when nothing narrows the list; else first a walk over a window of rows
        (complete if the page fills), then the filters' indexes as an expensive query."""
        read = partial(self._read_page, caller, filters, sort, limit, offset, after)
        scoped = not filters.include_deleted  # the sort indexes hold live rows only
        if not filters.narrows:
            if scoped:
                return await read("walk")
            async with self._policy.expensive.admit(
                "a list that includes deleted items", "include_deleted"
            ):
                return await read("walk", one_core=True)
        window = self._policy.list_window
        if scoped and offset + limit <= window:
            rows = await read("window", window)
            if len(rows) == limit:
                return rows
        gate = self._policy.expensive
        if _indexes_can_answer(filters):
            try:
                async with gate.quickly():
                    return await read("indexed")
            except NotQuick:
                pass  # not this quickly: wait for a turn like any expensive query
        async with gate.admit(*_expensive_part(filters)):
            return await read("indexed", one_core=True)

    async def _read_page(
        self,
        caller: Principal,
        filters: ItemFilter,
        sort: Sort,
        limit: int,
        offset: int,
        after: Position | None,
        plan: Plan,
        window: int = 0,
        *,
        one_core: bool = False,
    ) -> builtins.list[Item]:
        """`one_core`: an admitted expensive read, in a transaction that keeps it serial."""
        unit = self._db.transaction() if one_core else self._db.read()
        async with unit as session:
            return await ItemRepository(session).page(
                filters,
                sort,
                tenant=caller.reach,
                limit=limit,
                offset=offset,
                after=after,
                plan=plan,
                window=window,
                one_core=one_core,
            )

    # --- update ---------------------------------------------------------------------------

    async def replace(
        self,
        caller: Principal,
        item_id: UUID,
        fields: ItemFields,
        expected_versions: Collection[int] | None,
    ) -> Item:
        """Full replacement: every writable field takes the given value (absent -> default)."""
        return await self._update(caller, item_id, asdict(fields), expected_versions)

    async def patch(
        self,
        caller: Principal,
        item_id: UUID,
        changes: Mapping[str, Any],
        expected_versions: Collection[int] | None,
    ) -> Item:
        """Partial update: only the given fields change."""
        unknown = set(changes) - WRITABLE_FIELDS
        if unknown:
            raise InvalidQuery(f"fields cannot be changed: {', '.join(sorted(unknown))}", "body")
        if not changes:
            self._check_precondition_given(expected_versions)
            item = await self.get(caller, item_id)
            _check_version(item, expected_versions)
            return item
        return await self._update(caller, item_id, dict(changes), expected_versions)

    async def _update(
        self,
        caller: Principal,
        item_id: UUID,
        values: dict[str, Any],
        expected_versions: Collection[int] | None,
        *,
        deleted: bool = False,
    ) -> Item:
        self._check_precondition_given(expected_versions)
        values["updated_at"] = _now()
        # One conditional UPDATE; the read that explains a miss (404 or 412) needs no
        # transaction: under READ COMMITTED it would see a new snapshot anyway.
        async with self._db.write_one() as session:
            repo = ItemRepository(session)
            item = await repo.update(
                item_id,
                values,
                tenant=caller.reach,
                expected_versions=expected_versions,
                deleted=deleted,
            )
            if item is not None:
                return item
            current = await repo.get(item_id, tenant=caller.reach, include_deleted=True)
        raise self._why_not_written(item_id, current, expected_versions, deleted=deleted)

    # --- delete / restore -----------------------------------------------------------------

    async def soft_delete(
        self, caller: Principal, item_id: UUID, expected_versions: Collection[int] | None
    ) -> Item:
        """Hide the item from reads and lists; `restore` brings it back."""
        return await self._update(caller, item_id, {"deleted_at": _now()}, expected_versions)

    async def restore(
        self, caller: Principal, item_id: UUID, expected_versions: Collection[int] | None
    ) -> Item:
        self._check_precondition_given(expected_versions)
        async with self._db.write_one() as session:  # as _update
            repo = ItemRepository(session)
            values = {"deleted_at": None, "updated_at": _now()}
            item = await repo.update(
                item_id,
                values,
                tenant=caller.reach,
                expected_versions=expected_versions,
                deleted=True,
            )
            if item is not None:
                return item
            current = await repo.get(item_id, tenant=caller.reach, include_deleted=True)
        if current is not None and current.deleted_at is None:
            _check_version(current, expected_versions)
            return current  # already live: restoring is idempotent
        raise self._why_not_written(item_id, current, expected_versions, deleted=True)

    async def hard_delete(
        self, caller: Principal, item_id: UUID, expected_versions: Collection[int] | None
    ) -> None:
        """Remove the row for good, whether or not it was soft-deleted first."""
        self._check_precondition_given(expected_versions)
        async with self._db.write_one() as session:  # as _update
            repo = ItemRepository(session)
            reach = caller.reach
            if await repo.delete(item_id, tenant=reach, expected_versions=expected_versions):
                return
            current = await repo.get(item_id, tenant=reach, include_deleted=True)
        if current is None:
            raise NotFound(f"item {item_id} not found")
        _check_version(current, expected_versions)

    async def purge_expired_idempotency_keys(self) -> int:
        async with self._db.transaction() as session:
            return await ItemRepository(session).purge_keys(_now() - self._policy.idempotency_ttl)

    # --- helpers --------------------------------------------------------------------------

    def _check_precondition_given(self, expected_versions: Collection[int] | None) -> None:
        if self._policy.require_if_match and expected_versions is None:
            raise PreconditionRequired("this deployment requires If-Match on every write")

    @staticmethod
    def _why_not_written(
        item_id: UUID,
        current: Item | None,
        expected_versions: Collection[int] | None,
        *,
        deleted: bool,
    ) -> Exception:
        if current is None or (current.deleted_at is not None) != deleted:
            return NotFound(f"item {item_id} not found")
        return PreconditionFailed(
            f"item {item_id} is at version {current.version}, not the one in If-Match",
            current_version=current.version,
        )


def _check_version(item: Item, expected_versions: Collection[int] | None) -> None:
    if expected_versions is not None and item.version not in expected_versions:
        raise PreconditionFailed(
            f"item {item.id} is at version {item.version}, not the one in If-Match",
            current_version=item.version,
        )


# --- lists ---------------------------------------------------------------------------------

TRIGRAM = 3  # pg_trgm's unit: a term shorter than this has no trigram to look up


def _indexes_can_answer(filters: ItemFilter) -> bool:
    """Whether the filters' indexes can find the matches (a trigram needs three characters:
    a shorter search term is a scan of every row of the tenant, never tried quickly)."""
    return filters.q is None or len(filters.q) >= TRIGRAM


def _expensive_part(filters: ItemFilter) -> tuple[str, str]:
    """What makes a filtered list expensive, and its parameter."""
    if filters.q:
        return "this search", "q"
    if filters.min_price is not None or filters.max_price is not None:
        return "this price range", "min_price" if filters.min_price is not None else "max_price"
    return "this filter", "is_active"


# --- idempotency snapshots ----------------------------------------------------------------


def _fingerprint(fields: ItemFields) -> str:
    canonical = json.dumps(asdict(fields), sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _snapshot(item: Item) -> str:
    return json.dumps(asdict(item), default=str, separators=(",", ":"))


# How a snapshot's JSON value becomes the field's type again; derived from Item, so a field
# added there is carried without an edit here.
_DECODERS: dict[type, Callable[[Any], Any]] = {
    UUID: UUID,
    datetime: datetime.fromisoformat,
    Decimal: Decimal,
}


def _decoder(hint: object) -> Callable[[Any], Any]:
    kinds = [k for k in (get_args(hint) or (hint,)) if k is not type(None)]
    decode = _DECODERS.get(kinds[0]) if len(kinds) == 1 and isinstance(kinds[0], type) else None
    return decode or (lambda value: value)


_ITEM_FIELDS = {name: _decoder(hint) for name, hint in get_type_hints(Item).items()}


# What a snapshot written before a field existed stands for (e.g. the default tenant).
_ITEM_DEFAULTS = {field.name: field.default for field in fields(Item)}


def _from_snapshot(text: str) -> Item:
    raw = json.loads(text)
    values: dict[str, Any] = {
        name: _missing(name) if raw.get(name) is None else decode(raw[name])
        for name, decode in _ITEM_FIELDS.items()
    }
    return Item(**values)


def _missing(name: str) -> Any:
    default = _ITEM_DEFAULTS.get(name, MISSING)
    return None if default is MISSING else default


# --- keyset cursors -----------------------------------------------------------------------

CURSOR_MAC_BYTES = 16  # HMAC-SHA256, truncated to 128 bits
# The range a price cursor may name (numeric(12,2)).
_PRICE_LIMIT = Decimal("1e10")


class _Cursors:
    """Keyset cursors for one query: where the next page starts (the last row's sort value and
    id), bound to the query's filters, sort and tenant, signed so that a client can neither
    forge nor alter one (a forged cursor is refused before anything in it is decoded)."""

    def __init__(
        self, keys: tuple[bytes, ...], filters: ItemFilter, sort: Sort, reach: str | None
    ) -> None:
        self._keys = keys
        self._sort = sort
        canonical = json.dumps([asdict(filters), asdict(sort), reach], default=str, sort_keys=True)
        self._fingerprint = hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def _mac(self, key: bytes, body: str) -> str:
        digest = hmac.new(key, body.encode(), hashlib.sha256).digest()[:CURSOR_MAC_BYTES]
        return _b64(digest)

    def encode(self, last: Item) -> str:
        value = getattr(last, self._sort.field)
        payload = {
            "v": value.isoformat() if isinstance(value, datetime) else str(value),
            "id": str(last.id),
            "f": self._fingerprint,
        }
        body = _b64(json.dumps(payload, separators=(",", ":")).encode())
        return f"{body}.{self._mac(self._keys[0], body)}"

    def decode(self, cursor: str) -> Position:
        body, _, mac = cursor.rpartition(".")
        given = mac.encode()  # bytes: compare_digest refuses non-ASCII text
        if not body or not any(
            hmac.compare_digest(given, self._mac(key, body).encode()) for key in self._keys
        ):
            raise InvalidCursor("cursor is not one this service issued; start again without it")
        invalid = InvalidCursor("cursor is not valid; start again without it")
        try:
            payload = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
            fingerprint, text, raw_id = payload["f"], payload["v"], payload["id"]
        except (ValueError, KeyError, TypeError, binascii.Error) as error:
            raise invalid from error
        if fingerprint != self._fingerprint:
            raise InvalidCursor(
                "cursor belongs to a different sort or filter; start again without it"
            )
        if not isinstance(text, str) or not isinstance(raw_id, str) or not _storable(text):
            raise invalid
        try:
            return Position(value=self._value(text), id=UUID(raw_id))
        except (ValueError, TypeError, ArithmeticError) as error:
            raise invalid from error

    def _value(self, text: str) -> object:
        """The sort value, within what the column holds (the database is never asked to
        compare with what it cannot store)."""
        if self._sort.field == "created_at":
            instant = datetime.fromisoformat(text)
            if instant.tzinfo is None:
                raise ValueError("a cursor instant has a time zone")
            return instant.astimezone(UTC)  # OverflowError past year 9999
        if self._sort.field == "price":
            price = Decimal(text)
            if (
                not price.is_finite()
                or abs(price) >= _PRICE_LIMIT
                or price != price.quantize(CENTS)
            ):
                raise ValueError("a cursor price is a numeric(12,2)")
            return price
        return text


CENTS = Decimal("0.01")


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _storable(text: str) -> bool:
    """Text PostgreSQL can take: no NUL, and valid Unicode (no lone surrogates)."""
    if "\x00" in text:
        return False
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True
