"""Endpoint, Region, Peer, Transfer and Notification: the transfer API of DESIGN.md."""

from __future__ import annotations

import enum
import logging
from typing import Any, NamedTuple

import numpy as np

from . import _core
from .buffers import buffer_address
from .errors import InvalidRequestError, KVTransferError, error_for_code
from .errors import TimeoutError as KVTimeoutError

log = logging.getLogger("kvtransfer")

DEFAULT_TIMEOUT = 5.0


class Status(enum.IntEnum):
    PENDING = 0
    DONE = 1
    ERROR = 2


class Notification(NamedTuple):
    """Made by the core without running this class's Python (see make_notification)."""

    peer: str       # the initiating endpoint's name
    payload: bytes
    error: str | None = None  # set when the transfer that carried this payload failed


class Region:
    """Registered memory. ``id`` is what peers name it by; ``close()`` deregisters it (waiting
    for transfers that use it to drain)."""

    def __init__(self, ep: Endpoint, rid: int, nbytes: int, owner: Any, remote_write: bool,
                 remote_read: bool):
        self._ep = ep
        self.id = rid
        self.nbytes = nbytes
        self.remote_write = remote_write
        self.remote_read = remote_read
        self._owner = owner  # keeps the buffer alive while registered
        self._closed = False

    def close(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        if not self._closed:
            self._closed = True
            self._ep._core.deregister(self.id, timeout)
            self._ep._regions.pop(self.id, None)
            self._owner = None

    def __enter__(self) -> Region:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Region(id={self.id}, nbytes={self.nbytes})"


class Peer:
    """Another endpoint this one connected to."""

    def __init__(self, ep: Endpoint, core_peer: Any):
        self._ep = ep
        self._core = core_peer

    @property
    def name(self) -> str:
        return self._core.name

    @property
    def address(self) -> str:
        return self._core.address

    @property
    def alive(self) -> bool:
        return self._core.alive

    def regions(self, timeout: float = DEFAULT_TIMEOUT) -> dict[int, int]:
        """{region id: nbytes} the peer exposes now (asked over the wire)."""
        return dict(self._ep._core.peer_regions(self._core, timeout))

    def close(self) -> None:
        """Disconnects; transfers to this peer still in flight end in ERROR."""
        self._ep._core.disconnect(self._core)

    def __repr__(self) -> str:
        return f"Peer(name={self.name!r}, address={self.address!r}, alive={self.alive})"


class Transfer:
    """One write or read: PENDING until the target acknowledged it, then DONE or ERROR."""

    def __init__(self, ep: Endpoint, core_transfer: Any):
        self._ep = ep
        self._core = core_transfer

    @property
    def status(self) -> Status:
        return Status(self._core.status)

    @property
    def error(self) -> KVTransferError | None:
        if self._core.status != Status.ERROR:
            return None
        return error_for_code(self._core.code, self._core.error)

    @property
    def nbytes(self) -> int:
        return self._core.nbytes

    @property
    def latency_s(self) -> float:
        """Seconds from posting to completion (0 while pending)."""
        return self._core.latency_s

    def done(self) -> bool:
        return self._core.status != Status.PENDING

    def cancel(self) -> bool:
        """Best effort: ends the transfer in ERROR now and tells the target, whose wait for
        the notification then raises. Bytes already in flight may still land. False if the
        transfer had already ended."""
        return self._ep._core.cancel(self._core)

    def wait(self, timeout: float | None = DEFAULT_TIMEOUT) -> Transfer:
        """Waits for the end; raises the transfer's error if it failed, kvtransfer.TimeoutError
        if it is still pending after ``timeout`` seconds (None: wait for its own deadline)."""
        if not self._core.wait(-1.0 if timeout is None else float(timeout)):
            raise KVTimeoutError(f"transfer still pending after {timeout} s")
        err = self.error
        if err is not None:
            raise err
        return self

    def __repr__(self) -> str:
        return f"Transfer(status={self.status.name}, nbytes={self.nbytes})"


def as_segments(segments: Any) -> np.ndarray:
    """An int64 [N, 3] C-contiguous view of ``segments`` (copied only when it must be)."""
    try:
        arr = np.ascontiguousarray(segments, dtype=np.int64)
    except (TypeError, ValueError) as e:
        raise InvalidRequestError(
            f"segments must be integers (src_off, dst_off, len) per row: {e}") from None
    if arr.ndim != 2 or arr.shape[1] != 3:
        raise InvalidRequestError(
            f"segments must have shape [N, 3] (src_off, dst_off, len), got {arr.shape}")
    return arr


def _explain_refused_arguments(peer: Any, local: Any, remote_region: Any, segments: Any,
                               timeout: Any, checksum: Any) -> None:
    """Raises InvalidRequestError naming the argument the core refused (a TypeError there)."""
    if not isinstance(peer, Peer):
        raise InvalidRequestError(
            f"peer must be a Peer from connect(), got {type(peer).__name__}")
    if not isinstance(local, Region):
        raise InvalidRequestError(
            f"local must be a Region from register(), got {type(local).__name__}")
    as_segments(segments)
    if isinstance(remote_region, (int, np.integer)) and not 0 <= remote_region < 2**32:
        raise InvalidRequestError(f"remote_region {remote_region} is not a region id")
    for name, value, kinds in (("remote_region", remote_region, (int, np.integer)),
                               ("timeout", timeout, (int, float, type(None))),
                               ("checksum", checksum, (bool, int, type(None)))):
        if not isinstance(value, kinds):
            raise InvalidRequestError(f"{name} has the wrong type: {type(value).__name__}")


class Endpoint:
    """A kvtransfer endpoint: registers memory, accepts and makes connections, moves bytes.

    ``transport``: "tcp", "cma" (peers on this host only), "fabric" (with ``provider``) or
    "auto". ``timeout`` bounds every transfer and how long a dead peer can keep one pending.
    ``checksum=True`` adds a crc32c over every payload, checked where it lands (control
    messages always carry one; cma has no wire to protect and ignores it). ``faults``
    injects failures for testing (docs/transports.md), e.g. "reorder=1,delay_ms=5".
    """

    def __init__(self, name: str = "kvtransfer", transport: str = "tcp",
                 listen: str = "127.0.0.1:0", auth_token: str | None = None, *,
                 provider: str | None = None, timeout: float = DEFAULT_TIMEOUT,
                 connections: int = 2, checksum: bool = False, faults: str = ""):
        from .transports import resolve_transport

        core_transport = resolve_transport(transport, provider)
        self._core = _core.Endpoint(name=name, transport=core_transport, listen=listen,
                                    auth_token=auth_token or "", timeout=float(timeout),
                                    connections=int(connections), provider=provider or "",
                                    checksum=bool(checksum), faults=faults)
        self.name = name
        self.timeout = float(timeout)
        # Registered memory stays alive until its Region is closed, even if the caller drops
        # the Region object: a peer may still write into it.
        self._regions: dict[int, Region] = {}

    # -- memory
    def register(self, buf: Any, remote_write: bool = False, remote_read: bool = False) -> Region:
        addr, nbytes, owner, writeable = buffer_address(buf)
        if remote_write and not writeable:
            raise InvalidRequestError("cannot register read-only memory with remote_write=True")
        rid = self._core.register(addr, nbytes, remote_write, remote_read)
        region = Region(self, rid, nbytes, owner if owner is not None else buf, remote_write,
                        remote_read)
        self._regions[rid] = region
        return region

    # -- identity
    @property
    def address(self) -> str:
        return self._core.address

    def info(self) -> bytes:
        """Versioned bytes a peer passes to connect(): address, transport, exposed regions."""
        return self._core.info()

    def caps(self) -> dict[str, Any]:
        return self._core.caps()

    # -- peers
    def connect(self, target: bytes | str, timeout: float | None = None) -> Peer:
        """Handshakes with the endpoint at ``target`` (its info() bytes or "host:port")."""
        raw = target.encode() if isinstance(target, str) else bytes(target)
        return Peer(self, self._core.connect(raw, float(timeout or self.timeout)))

    # -- transfers
    # The latency path: every Python step here is paid on each transfer, on a CPU gone cold
    # between requests. So each is one call into the core, which converts and checks the
    # arguments itself; Python only explains what it refused.
    def write(self, peer: Peer, local: Region, remote_region: int, segments: Any,
              notify: bytes | None = None, timeout: float | None = None,
              checksum: bool | None = None) -> Transfer:
        """Copies local[src:src+len] to the peer's region at dst for each (src, dst, len)."""
        try:
            return Transfer(self, self._core.transfer(
                True, peer._core, local.id, remote_region, segments, notify, timeout or 0.0,
                -1 if checksum is None else checksum))
        except (AttributeError, TypeError):
            _explain_refused_arguments(peer, local, remote_region, segments, timeout, checksum)
            raise

    def read(self, peer: Peer, local: Region, remote_region: int, segments: Any,
             notify: bytes | None = None, timeout: float | None = None,
             checksum: bool | None = None) -> Transfer:
        """Copies the peer's region at src to local[dst:dst+len] for each (src, dst, len)."""
        try:
            return Transfer(self, self._core.transfer(
                False, peer._core, local.id, remote_region, segments, notify, timeout or 0.0,
                -1 if checksum is None else checksum))
        except (AttributeError, TypeError):
            _explain_refused_arguments(peer, local, remote_region, segments, timeout, checksum)
            raise

    # -- notifications
    def wait_notification(self, payload: bytes, timeout: float = DEFAULT_TIMEOUT,
                          spin: float = 0.0) -> Notification:
        """Waits for the notification ``payload``; raises TransportError if its transfer failed
        and kvtransfer.TimeoutError if none arrives in time. On TCP and cma this thread reads
        what arrives itself, asleep in poll() on the connections, so a small transfer wakes it
        alone. ``spin`` > 0 polls for up to that many seconds first instead: lower latency
        still (nothing to wake), paid for with a busy core while it polls; the default never
        spins (docs/transports.md, "Waiters that read")."""
        return self._core.wait_notification(payload, timeout, spin)

    def notifications(self, timeout: float = 0.0) -> list[Notification]:
        """Notifications (and failure events, with ``error`` set) that arrived, each returned
        once. With ``timeout`` > 0, first waits up to that long for at least one, reading what
        arrives as wait_notification does."""
        return self._core.notifications(timeout)

    def errors(self) -> list[KVTransferError]:
        """Errors this endpoint saw from peers (bad frames, failed authentication), newest last."""
        return [error_for_code(code, msg) for code, msg in self._core.errors()]

    def stats(self) -> dict[str, Any]:
        return self._core.stats()

    def close(self) -> None:
        self._core.close()

    def __enter__(self) -> Endpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Endpoint(name={self.name!r}, address={self.address!r})"
