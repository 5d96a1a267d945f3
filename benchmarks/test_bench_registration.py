"""Micro benchmark: registering and deregistering memory (what a serving framework pays once per
KV cache, and what an offload path pays per buffer)."""

from __future__ import annotations

import numpy as np
import pytest

import kvtransfer as kvt


@pytest.fixture(scope="module")
def ep():
    with kvt.Endpoint("bench-registration") as e:
        yield e


@pytest.mark.parametrize("mib", [1, 64, 1024])
def test_register_and_close(benchmark, ep, mib):
    buf = np.zeros(mib << 20, np.uint8)

    def cycle():
        ep.register(buf, remote_write=True).close()

    benchmark(cycle)
