"""Times in the model: relative specifications from host files, and the protocol's ISO 8601 UTC form."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

Clock = Callable[[], datetime]

_RELATIVE = re.compile(r"^(?P<sign>[+-])(?P<amount>\d+)(?P<unit>[smhdw])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def utc_now() -> datetime:
    return datetime.now(UTC)


def anchor_of(now: datetime) -> datetime:
    """The reference point for relative times in host files: the start of the current UTC day.

    Certificates built from the same file on the same day then get the same validity dates, hence the same DER bytes
    and thumbprints (RSA PKCS#1 v1.5 signatures are deterministic), which keeps snapshots and inventories stable.
    """
    return now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)


def parse_time(spec: object, anchor: datetime) -> datetime:
    """``-10d`` / ``+200d`` / ``+6h`` relative to ``anchor``, ``now``, or an ISO 8601 time; ValueError otherwise."""
    if isinstance(spec, datetime):
        return spec if spec.tzinfo else spec.replace(tzinfo=UTC)
    if not isinstance(spec, str):
        raise ValueError(f"expected a time such as '-10d', '+200d' or '2026-01-01T00:00:00Z', got {spec!r}")
    text = spec.strip()
    if text == "now":
        return anchor
    match = _RELATIVE.match(text)
    if match:
        delta = timedelta(**{_UNITS[match["unit"]]: int(match["amount"])})
        return anchor + delta if match["sign"] == "+" else anchor - delta
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"expected a time such as '-10d', '+200d' or '2026-01-01T00:00:00Z', got {spec!r}") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def iso(moment: datetime) -> str:
    """ISO 8601 UTC with a Z, whole seconds, as the protocol wants."""
    return moment.astimezone(UTC).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def shifted_clock(start: datetime) -> Clock:
    """A clock that reads ``start`` now and then advances with real time (hosts loaded "as of" another day)."""
    offset = start - utc_now()

    def now() -> datetime:
        return utc_now() + offset

    return now
