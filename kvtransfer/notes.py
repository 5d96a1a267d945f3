"""Routes a KV endpoint's notifications to the requests they belong to.

The KV layer tags every transfer with a note (wire/ticket.h: request, source rank, layers,
which write of how many). One NoteRouter per Endpoint drains its notifications; whichever
thread waits pumps them (blocking in the C++ core, GIL released) and wakes the others.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

from . import _core
from .endpoint import Endpoint, Notification
from .errors import TimeoutError as KVTimeoutError

PUMP_SLICE_S = 0.05  # a pumping waiter re-checks its own condition at least this often


@dataclass(frozen=True)
class Note:
    kind: str  # "layers" or "pulled"
    request_id: str
    src_rank: int
    n_sources: int
    layer_begin: int
    layer_end: int
    group: int
    n_groups: int
    error: str | None  # set when the transfer carrying this note failed


class NoteRouter:
    _by_endpoint: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
    _lock = threading.Lock()

    @classmethod
    def of(cls, ep: Endpoint) -> NoteRouter:
        with cls._lock:
            router = cls._by_endpoint.get(ep)
            if router is None:
                router = cls._by_endpoint[ep] = cls(ep)
            return router

    def __init__(self, ep: Endpoint):
        self._ep = ep
        self._cond = threading.Condition()
        self._pumping = False
        self._notes: dict[str, list[Note]] = defaultdict(list)
        self.unclaimed: list[Notification] = []  # notifications that are not KV notes

    def take(self, request_id: str) -> list[Note]:
        """Notes that arrived for ``request_id`` since the last take (call with the lock)."""
        return self._notes.pop(request_id, [])

    def wait(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        """Blocks until ``ready()`` (called under the router's lock, after new notes were
        filed) is true; kvtransfer.TimeoutError after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not ready():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise KVTimeoutError(f"{what} not complete within {timeout:.3g} s")
                if self._pumping:
                    self._cond.wait(min(left, PUMP_SLICE_S))
                    continue
                self._pumping = True
                self._cond.release()
                try:
                    got = self._ep.notifications(timeout=min(left, PUMP_SLICE_S))
                finally:
                    self._cond.acquire()
                    self._pumping = False
                self._file(got)
                self._cond.notify_all()

    def poll(self) -> None:
        """Files whatever arrived, without blocking."""
        with self._cond:
            if not self._pumping:
                self._file(self._ep.notifications())

    @property
    def lock(self) -> threading.Condition:
        return self._cond

    def _file(self, got: list[Notification]) -> None:
        for n in got:
            d = _core.decode_note(n.payload)
            if d is None:
                self.unclaimed.append(n)
                continue
            kind, rid, *fields = d
            rid = rid.decode(errors="replace")
            self._notes[rid].append(Note(kind, rid, *fields, error=n.error))
