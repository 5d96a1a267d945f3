"""Shared fixtures: endpoints on loopback and helpers to run a peer in another process."""

from __future__ import annotations

import multiprocessing as mp
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


@pytest.fixture
def spawn() -> Iterator:
    """spawn(fn, *args) -> (process, parent end of a Pipe); children are killed at teardown."""
    ctx = mp.get_context("spawn")
    procs: list = []

    def start(fn, *args):
        parent, child = ctx.Pipe()
        p = ctx.Process(target=fn, args=(child, *args), daemon=True)
        p.start()
        procs.append(p)
        return p, parent

    yield start
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join(5)
