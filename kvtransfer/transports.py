"""Which core transport a user's ``transport=`` / ``provider=`` arguments mean."""

from __future__ import annotations

import logging

from . import _core
from .errors import InvalidRequestError

log = logging.getLogger("kvtransfer")


def available() -> list[str]:
    """Core transports compiled into this build."""
    return list(_core.transports())


def resolve_transport(transport: str, provider: str | None) -> str:
    names = available()
    if transport == "auto":
        chosen = "fabric" if "fabric" in names and provider else "tcp"
        log.info("transport='auto' picked %r (built: %s; provider=%r)", chosen, names, provider)
        return chosen
    if transport not in names:
        raise InvalidRequestError(
            f"transport {transport!r} is not available in this build (built: {', '.join(names)})")
    return transport
