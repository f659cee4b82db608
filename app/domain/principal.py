"""Who is calling."""

from __future__ import annotations

from dataclasses import dataclass, field

# Scopes the routes require.
READ = "items:read"
WRITE = "items:write"
GENERATE = "generate"
ALL_SCOPES = frozenset({READ, WRITE, GENERATE})


@dataclass(frozen=True, slots=True)
class Principal:
    subject: str  # the token's `sub`, or "anonymous"
    scopes: frozenset[str] = field(default_factory=frozenset)
    anonymous: bool = False
    client: str = ""  # the caller's address (for per-address limits of anonymous callers)

    @property
    def rate_key(self) -> str:
        """What limits are counted against: the subject, or the address when anonymous."""
        return f"addr:{self.client}" if self.anonymous else f"sub:{self.subject}"
