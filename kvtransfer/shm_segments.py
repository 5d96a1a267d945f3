"""Shared-memory segments that libfabric's shm provider left behind in /dev/shm.

A process that uses ``transport="fabric", provider="shm"`` owns a segment there (16 MiB with
libfabric 1.17) and removes it when its endpoint closes. A killed process cannot: its segment
stays, in RAM, until someone removes it, so a host whose workers crash accumulates them.
kvtransfer names its endpoints' segments ``<pid>:<n>:<n>-<16 hex digits>`` (the suffix is its
own, see csrc/transport/fabric/fabric_rail.cpp), which tells them from other programs' files.

A segment is stale when no process with its pid exists. Pids are judged in this process's pid
namespace: where /dev/shm is shared with containers of another pid namespace, a live process
there looks dead here, so do not remove segments from such a host (``kvtransfer doctor``
reports them; ``--clean-shm`` removes them).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

SHM_DIR = "/dev/shm"
_NAME = re.compile(r"^(\d+):\d+:\d+-[0-9a-f]{16}$")


@dataclass(frozen=True)
class Segment:
    path: str
    pid: int
    bytes_used: int  # memory it holds (segments are sparse: less than their size)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def stale(shm_dir: str = SHM_DIR) -> list[Segment]:
    """kvtransfer's shm segments whose process no longer exists, oldest pid first."""
    try:
        names = os.listdir(shm_dir)
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        m = _NAME.match(name)
        if not m or _alive(int(m.group(1))):
            continue
        path = os.path.join(shm_dir, name)
        try:
            st = os.stat(path)
        except FileNotFoundError:  # removed meanwhile
            continue
        found.append(Segment(path, int(m.group(1)), st.st_blocks * 512))
    return sorted(found, key=lambda s: (s.pid, s.path))


def remove(segments: list[Segment]) -> tuple[int, int]:
    """Removes the segments that are still stale; returns (how many, bytes freed)."""
    count = freed = 0
    for s in segments:
        if _alive(s.pid):  # the pid was reused since: not ours to judge any more
            continue
        try:
            os.unlink(s.path)
        except FileNotFoundError:
            continue
        count += 1
        freed += s.bytes_used
    return count, freed
