"""Shared fixtures: endpoints on loopback. `spawn` (a peer in another process) and the other
conformance fixtures come from the kvtransfer.testing pytest plugin, installed with the package."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import kvtransfer as kvt


@pytest.fixture
def pair() -> Iterator[tuple[kvt.Endpoint, kvt.Endpoint]]:
    """(target, initiator): a decode endpoint and a prefill endpoint on loopback."""
    target = kvt.Endpoint("decode", listen="127.0.0.1:0", timeout=3.0)
    initiator = kvt.Endpoint("prefill", listen="127.0.0.1:0", timeout=3.0)
    yield target, initiator
    initiator.close()
    target.close()
