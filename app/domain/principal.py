"""Who is calling, and which tenant's data they reach."""

from __future__ import annotations

from dataclasses import dataclass, field

# Scopes the routes require.
READ = "items:read"
WRITE = "items:write"
GENERATE = "generate"
ALL_SCOPES = frozenset({READ, WRITE, GENERATE})
# The scope that reaches every tenant's items and generations (operators); its name is a
# setting (AUTH_ADMIN_SCOPE), this is its default.
DEFAULT_ADMIN_SCOPE = "items:admin"
# The tenant of every row written before tenancy existed, and of every caller when
# authentication is off (AUTH_MODE=none): one tenant, as before.
DEFAULT_TENANT = "default"


@dataclass(frozen=True, slots=True)
class Principal:
    subject: str  # the token's `sub`, or "anonymous"
    scopes: frozenset[str] = field(default_factory=frozenset)
    anonymous: bool = False
    client: str = ""  # the caller's address (for per-address limits of anonymous callers)
    tenant: str = DEFAULT_TENANT  # the token's tenant claim (AUTH_TENANT_CLAIM)
    admin: bool = False  # holds the admin scope: reaches every tenant

    @property
    def rate_key(self) -> str:
        """What limits are counted against: the subject, or the address when anonymous."""
        return f"addr:{self.client}" if self.anonymous else f"sub:{self.subject}"

    @property
    def reach(self) -> str | None:
        """The tenant every read and write of this caller is confined to, in the query
        itself; None for an administrator (every tenant)."""
        return None if self.admin else self.tenant

    @property
    def author(self) -> str | None:
        """What is stored as the creator of a row (never "anonymous")."""
        return None if self.anonymous else self.subject
