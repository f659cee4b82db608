"""Items routes: parse and validate, call the service, shape the response. No logic here."""

from __future__ import annotations

from typing import Annotated, Any, Literal, NoReturn
from uuid import UUID

from fastapi import (
    APIRouter,
    Body,
    Depends,
    Header,
    HTTPException,
    Query,
    Request,
    Response,
    status,
)

from app.api.deps import IfMatch, ItemsReader, ItemsWriter
from app.api.etags import etag, none_match_fails
from app.api.responses import ModelResponse
from app.api.schemas import NO_NUL, ItemIn, ItemOut, ItemPageOut, ItemPatch, Money, Problem
from app.api.streaming import ExportResponse
from app.domain.models import Item, ItemFilter, Sort
from app.domain.ports import Writer
from app.services.items import ExportFormat

router = APIRouter(prefix="/v1/items", tags=["items"])

PROBLEMS = {
    code: {"model": Problem, "content": {"application/problem+json": {}}}
    for code in (404, 412, 422, 428, 503)
}
# What a write to an existing item may answer: it is gone, or If-Match is stale or missing.
CONDITIONAL_WRITE: dict[int | str, dict[str, Any]] = {
    code: PROBLEMS[code] for code in (404, 412, 428)
}

SortParam = Literal["created_at", "-created_at", "name", "-name", "price", "-price"]
IdempotencyKey = Annotated[
    str | None,
    Header(
        min_length=1,
        max_length=255,
        pattern=r"^[\x21-\x7e]+$",
        description="Makes a retried create return the first response instead of a second item",
    ),
]


async def _filters(
    is_active: bool | None = None,
    min_price: Annotated[Money | None, Query()] = None,
    max_price: Annotated[Money | None, Query()] = None,
    q: Annotated[
        str | None,
        Query(
            max_length=200, pattern=NO_NUL, description="in name or description; empty: no filter"
        ),
    ] = None,
    include_deleted: bool = False,
) -> ItemFilter:
    return ItemFilter(
        is_active=is_active,
        min_price=min_price,
        max_price=max_price,
        q=q or None,
        include_deleted=include_deleted,
    )


Filters = Annotated[ItemFilter, Depends(_filters)]


def _sort(param: SortParam) -> Sort:
    return Sort(field=param.lstrip("-"), descending=param.startswith("-"))  # type: ignore[arg-type]


def _item(item: Item, status_code: int = 200, **headers: str) -> ModelResponse:
    return ModelResponse(ItemOut.of(item), status_code, {"ETag": etag(item.version), **headers})


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    summary="Create an item",
    description=(
        "Returns 201 with `Location` and `ETag`. With an `Idempotency-Key`, a retry returns the "
        "first response (marked `Idempotent-Replayed: true`) and stores nothing new; reusing the "
        "key with a different body gets 422. Keys expire after IDEMPOTENCY_TTL_SECONDS."
    ),
    response_model=ItemOut,
    responses={409: PROBLEMS[422], 422: PROBLEMS[422], 503: PROBLEMS[503]},
)
async def create_item(
    body: ItemIn,
    request: Request,
    items: ItemsWriter,
    idempotency_key: IdempotencyKey = None,
) -> ModelResponse:
    created = await items.service.create(items.caller, body.to_fields(), idempotency_key)
    # Not request.url_for(): it searches every route of the app on each create. The root path
    # is where a proxy mounts the app (uvicorn --root-path), as url_for would include it.
    root = request.scope.get("root_path", "")
    headers = {"Location": f"{root}{router.prefix}/{created.item.id}"}
    if created.replayed:
        headers["Idempotent-Replayed"] = "true"
    return _item(created.item, 201, **headers)


@router.get(
    "",
    summary="List items",
    description=(
        "Offset pages (`page`, `per_page`) or keyset pages (`cursor` from `next_cursor`, stable "
        "while rows are inserted); `next_cursor` is null on the last page. `include_total=true` "
        "adds `total`, at the cost of counting every match; a `cursor` the service did not "
        "issue, or one of another query, is 400. `q` matches name or description, "
        "case-insensitively and literally (`%` and `_` are not wildcards). Soft-deleted items "
        "are hidden unless `include_deleted=true`."
    ),
    response_model=ItemPageOut,
    responses={400: PROBLEMS[422], 422: PROBLEMS[422], 503: PROBLEMS[503]},
)
async def list_items(
    request: Request,
    items: ItemsReader,
    filters: Filters,
    page: Annotated[
        int | None, Query(ge=1, le=1_000_000, description="ignored with a cursor")
    ] = None,
    per_page: Annotated[int | None, Query(ge=1, description="at most MAX_PAGE_SIZE")] = None,
    cursor: Annotated[str | None, Query(max_length=512, pattern=NO_NUL)] = None,
    sort: SortParam = "-created_at",
    include_total: Annotated[
        bool, Query(description="also count all matching items (a COUNT over them: costly)")
    ] = False,
) -> ModelResponse:
    result = await items.service.list(
        items.caller,
        filters,
        _sort(sort),
        per_page=per_page,
        page=page,
        cursor=cursor or None,
        include_total=include_total,
    )
    headers = {}
    if result.next_cursor:
        next_url = request.url.remove_query_params(["page", "cursor"]).include_query_params(
            cursor=result.next_cursor
        )
        headers["Link"] = f'<{next_url.path}?{next_url.query}>; rel="next"'
    return ModelResponse(ItemPageOut.of(result), headers=headers)


EXPORT_TYPES = {"ndjson": "application/x-ndjson", "csv": "text/csv; charset=utf-8"}


@router.get(
    "/export",
    summary="Export all matching items as NDJSON or CSV",
    description=(
        "Every item matching the list filters, streamed from one consistent snapshot in "
        "constant memory: NDJSON by default, CSV (with a header row) with `format=csv` or "
        "`Accept: text/csv`. Timestamps are UTC RFC 3339. A transfer that breaks off midway "
        "is aborted, never silently cut short."
    ),
    response_class=ExportResponse,
    status_code=200,
    responses={
        200: {"content": {"application/x-ndjson": {}, "text/csv": {}}},
        422: PROBLEMS[422],
        503: PROBLEMS[503],
    },
)
async def export_items(
    request: Request,
    items: ItemsReader,
    filters: Filters,
    sort: SortParam = "-created_at",
    format: Annotated[ExportFormat | None, Query(description="default: from Accept")] = None,
) -> ExportResponse:
    fmt: ExportFormat = format or (
        "csv" if "text/csv" in request.headers.get("accept", "") else "ndjson"
    )
    order = _sort(sort)

    async def produce(write: Writer) -> int:
        return await items.service.export(items.caller, filters, order, fmt, write)

    return ExportResponse(produce, media_type=EXPORT_TYPES[fmt], filename=f"items.{fmt}")


# Matched before `/{item_id}` (Starlette tries routes in order): without it `PUT /v1/items/export`
# would reach the item routes as item "export". The document lists GET only, so this is 405.
@router.api_route(
    "/export", methods=["PUT", "PATCH", "DELETE"], include_in_schema=False, response_model=None
)
async def export_is_read_only() -> NoReturn:
    raise HTTPException(status.HTTP_405_METHOD_NOT_ALLOWED)


@router.get(
    "/{item_id}",
    name="get_item",
    summary="Get an item",
    description="Soft-deleted items are 404 unless `include_deleted=true`.",
    response_model=ItemOut,
    responses={304: {"description": "If-None-Match matched"}, 404: PROBLEMS[404]},
)
async def get_item(
    item_id: UUID,
    items: ItemsReader,
    include_deleted: bool = False,
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    item = await items.service.get(items.caller, item_id, include_deleted=include_deleted)
    if if_none_match is not None and none_match_fails(if_none_match, item.version):
        return Response(status_code=304, headers={"ETag": etag(item.version)})
    return _item(item)


@router.put(
    "/{item_id}",
    summary="Replace an item",
    response_model=ItemOut,
    description=(
        "Full replacement: every field takes the body's value; omitted optional fields are reset "
        "to their defaults (`description` null, `is_active` true). Send `If-Match` with the ETag "
        "you read to avoid overwriting someone else's change (412 on mismatch)."
    ),
    responses=CONDITIONAL_WRITE,
)
async def replace_item(
    item_id: UUID, body: ItemIn, items: ItemsWriter, if_match: IfMatch
) -> ModelResponse:
    return _item(await items.service.replace(items.caller, item_id, body.to_fields(), if_match))


@router.patch(
    "/{item_id}",
    summary="Partially update an item",
    response_model=ItemOut,
    description=(
        "JSON Merge Patch (RFC 7396, `application/merge-patch+json` or `application/json`): only "
        "the fields present change; `description: null` clears it. `If-Match` as for PUT."
    ),
    responses=CONDITIONAL_WRITE,
)
async def patch_item(
    item_id: UUID,
    body: Annotated[ItemPatch, Body(media_type="application/merge-patch+json")],
    items: ItemsWriter,
    if_match: IfMatch,
) -> ModelResponse:
    return _item(await items.service.patch(items.caller, item_id, body.changes(), if_match))


@router.delete(
    "/{item_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Delete an item (soft by default)",
    description=(
        "Soft delete hides the item from reads and lists and keeps the row; "
        "`POST /v1/items/{id}/restore` brings it back. `permanent=true` removes the row for "
        "good (also for a soft-deleted item) and cannot be undone."
    ),
    responses=CONDITIONAL_WRITE,
)
async def delete_item(
    item_id: UUID, items: ItemsWriter, if_match: IfMatch, permanent: bool = False
) -> Response:
    if permanent:
        await items.service.hard_delete(items.caller, item_id, if_match)
    else:
        await items.service.soft_delete(items.caller, item_id, if_match)
    return Response(status_code=204)


@router.post(
    "/{item_id}/restore",
    summary="Restore a soft-deleted item",
    response_model=ItemOut,
    description="Idempotent: restoring a live item returns it unchanged.",
    responses=CONDITIONAL_WRITE,
)
async def restore_item(item_id: UUID, items: ItemsWriter, if_match: IfMatch) -> ModelResponse:
    return _item(await items.service.restore(items.caller, item_id, if_match))
