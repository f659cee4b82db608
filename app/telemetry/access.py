"""The access log: one line per request, with the route template (never the query string or
the body), the caller's subject and tenant (never the token), and whether the caller used
the admin scope, which reaches every tenant. Written by the edge layer
(app.api.edge) while the request's trace context is current, so each line has its trace id."""

from __future__ import annotations

import logging

log = logging.getLogger("itemstream.access")


def log_request(
    *,
    quiet: bool,
    method: str,
    route: str,
    path: str,
    status: int,
    seconds: float,
    principal: str | None,
    tenant: str | None = None,
    admin: bool = False,
) -> None:
    """`quiet` (probes and scrapes) logs at DEBUG, everything else at INFO."""
    level = logging.DEBUG if quiet else logging.INFO
    if not log.isEnabledFor(level):
        return
    fields: dict[str, object] = {
        "method": method,
        "route": route,
        "path": path,
        "status": status,
        "duration_ms": round(seconds * 1000, 2),
    }
    if principal is not None:
        fields["principal"] = principal
    if tenant is not None:
        fields["tenant"] = tenant
    if admin:
        fields["admin"] = True  # reached across tenants with the admin scope
    # As log.log() would, minus its search of the call stack for a file and line that would
    # always name this function.
    args = (method, route, status)
    record = log.makeRecord(log.name, level, __file__, 0, "%s %s %s", args, None, "log_request")
    record.http = fields
    log.handle(record)
