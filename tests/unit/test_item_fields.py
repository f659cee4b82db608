"""One place per field: the domain model is the list of an item's fields, and the column
lists, the export (columns, JSON and CSV renderings) and the API schemas agree with it. A
field added per CONTRIBUTING.md's recipe passes these without other edits; one added in
only some places fails here."""

from __future__ import annotations

from dataclasses import fields

from app.api.schemas import GenerationOut, ItemIn, ItemOut, ItemPatch
from app.db import items as item_sql
from app.db.generations import _COLUMNS as GENERATION_COLUMNS
from app.db.tables import generations, items
from app.domain.models import Generation, Item, ItemFields
from app.services.items import WRITABLE_FIELDS

ITEM = [field.name for field in fields(Item)]


def test_the_database_layer_derives_its_columns_from_the_domain() -> None:
    assert list(item_sql.ITEM_FIELDS) == ITEM
    assert [column.name for column in item_sql._ITEM_COLUMNS] == ITEM
    assert set(ITEM) <= set(items.c.keys()), "every field of Item is a column"
    assert [c.name for c in GENERATION_COLUMNS] == [f.name for f in fields(Generation)]
    assert {f.name for f in fields(Generation)} <= set(generations.c.keys())


def test_the_export_carries_every_field_rendered_by_its_column_type() -> None:
    assert list(item_sql.EXPORT_COLUMNS) == ITEM
    assert set(item_sql._JSON_TEXT) == set(ITEM)
    for name in ITEM:
        nullable = items.c[name].nullable
        assert item_sql._JSON_TEXT[name].startswith("coalesce(") == bool(nullable), name
    assert {"price"} == item_sql._NUMBERS
    assert set(item_sql._CSV_TEXT) == {"is_active", "created_at", "updated_at", "deleted_at"}


def test_the_api_schemas_cover_the_domain_fields() -> None:
    assert list(ItemOut.model_fields) == ITEM, "ItemOut shows every field, in order"
    writable = [field.name for field in fields(ItemFields)]
    assert list(ItemIn.model_fields) == writable
    assert list(ItemPatch.model_fields) == writable
    assert set(WRITABLE_FIELDS) == set(writable), "PATCH accepts exactly the writable fields"
    shown = set(GenerationOut.model_fields)
    assert shown == {f.name for f in fields(Generation)} - {"idempotency_key"}
