"""pytest plugin of the conformance suite (registered as a ``pytest11`` entry point): adds
``--transport`` and the fixtures every case uses."""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import kvtransfer as kvt


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("kvtransfer")
    group.addoption("--transport", default="tcp",
                    help="transport under test: tcp, fabric, fabric:PROVIDER (tcp, udp, shm, "
                         "efa, ...). Default: tcp")


def pytest_report_header(config: pytest.Config) -> str:
    spec = config.getoption("--transport")
    try:
        with kvt.Endpoint("probe", **transport_kwargs(spec)) as ep:
            return f"kvtransfer conformance: --transport {spec} -> {ep.caps()}"
    except kvt.KVTransferError as e:
        return f"kvtransfer conformance: --transport {spec} is not available here ({e})"


def transport_kwargs(spec: str) -> dict[str, Any]:
    """Endpoint keyword arguments for a --transport value."""
    name, _, provider = spec.partition(":")
    kwargs: dict[str, Any] = {"transport": name}
    if provider:
        kwargs["provider"] = provider
    return kwargs


@pytest.fixture(scope="session")
def ep_kwargs(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The --transport under test as Endpoint kwargs; skips the session's cases, saying why,
    when this build or host cannot make such an endpoint."""
    kwargs = transport_kwargs(request.config.getoption("--transport"))
    try:
        kvt.Endpoint("probe", **kwargs).close()
    except kvt.KVTransferError as e:
        pytest.skip(f"transport {kwargs} is not available here: {e}")
    return kwargs


@pytest.fixture(scope="session")
def caps(ep_kwargs: dict[str, Any]) -> dict[str, Any]:
    with kvt.Endpoint("probe", **ep_kwargs) as ep:
        return ep.caps()


@pytest.fixture
def endpoint(ep_kwargs: dict[str, Any]) -> Iterator[Callable[..., kvt.Endpoint]]:
    """endpoint(name, **overrides) -> an Endpoint on the transport under test, closed after."""
    made: list[kvt.Endpoint] = []

    def make(name: str, **overrides: Any) -> kvt.Endpoint:
        ep = kvt.Endpoint(name, **{"timeout": 5.0, **ep_kwargs, **overrides})
        made.append(ep)
        return ep

    yield make
    for ep in reversed(made):
        ep.close()


@pytest.fixture
def spawn() -> Iterator[Callable]:
    """spawn(fn, *args) -> (process, parent end of a Pipe); children are killed at teardown."""
    ctx = mp.get_context("spawn")
    procs: list = []

    def start(fn: Callable, *args: Any):
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


def require(caps: dict[str, Any], capability: str) -> None:
    """Skips the case, naming the capability, when the transport does not claim it."""
    if not caps.get(capability):
        pytest.skip(f"transport {caps.get('name')} does not claim {capability}")
