"""Time-ordered UUIDs (RFC 9562 version 7): new rows land at the right edge of the primary-key
index instead of at random pages, which keeps inserts cheap as the table grows."""

from __future__ import annotations

import os
import time
from uuid import UUID


def uuid7() -> UUID:
    millis = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (millis & 0xFFFF_FFFF_FFFF) << 80
    value |= 0x7 << 76  # version
    value |= ((rand >> 62) & 0xFFF) << 64  # rand_a
    value |= 0b10 << 62  # variant
    value |= rand & 0x3FFF_FFFF_FFFF_FFFF  # rand_b
    return UUID(int=value)
