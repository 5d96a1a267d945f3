"""Which core transport a user's ``transport=`` / ``provider=`` arguments mean.

``transport="fabric"`` hands ``provider`` to the core (``csrc/transport/fabric/``), which picks
the provider and its domains; asking for one that is not there is an error, never a fallback.
``transport="auto"`` picks the best transport this host has and logs what and why.

The libfabric probe here (for ``auto`` and ``kvtransfer doctor``) loads the same file the core
loads, in the same order (see ``csrc/transport/fabric/fabric_loader.h``), so one process never
maps two copies of libfabric.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from dataclasses import dataclass, field

from . import _core
from .errors import InvalidRequestError

log = logging.getLogger("kvtransfer")

LIBFABRIC_ENV = "KVTRANSFER_LIBFABRIC"
EFA_LIBFABRIC = ("/opt/amazon/efa/lib/libfabric.so.1", "/opt/amazon/efa/lib64/libfabric.so.1")

#: Short names accepted for ``provider=``; anything else is a libfabric provider name.
PROVIDER_ALIASES = {"tcp": "tcp;ofi_rxm", "udp": "udp;ofi_rxd", "verbs": "verbs;ofi_rxm"}
#: The order the core tries providers in when none is named (fabric_info.cpp).
PROVIDER_PREFERENCE = ("efa", "verbs;ofi_rxm", "cxi", "psm3", "tcp;ofi_rxm", "udp;ofi_rxd", "shm")
#: Providers backed by RDMA hardware: the only ones ``auto`` prefers over the native TCP
#: transport (the software providers move bytes through the same kernel sockets, slower).
HARDWARE_PROVIDERS = ("efa", "verbs;ofi_rxm", "cxi", "psm3")

# libfabric ABI (include/rdma/fabric.h); stable since 1.5.
FI_MSG, FI_RMA, FI_TAGGED, FI_ATOMIC = 1 << 1, 1 << 2, 1 << 3, 1 << 4
FI_READ, FI_WRITE, FI_RECV, FI_SEND = 1 << 8, 1 << 9, 1 << 10, 1 << 11
FI_REMOTE_READ, FI_REMOTE_WRITE = 1 << 12, 1 << 13
FI_HMEM, FI_RMA_EVENT, FI_SOURCE = 1 << 47, 1 << 56, 1 << 57
FI_CONTEXT, FI_ASYNC_IOV, FI_RX_CQ_DATA, FI_CONTEXT2 = 1 << 59, 1 << 57, 1 << 56, 1 << 52
FI_EP_RDM = 3
_CAP_NAMES = [(FI_MSG, "MSG"), (FI_RMA, "RMA"), (FI_TAGGED, "TAGGED"), (FI_ATOMIC, "ATOMIC"),
              (FI_READ, "READ"), (FI_WRITE, "WRITE"), (FI_REMOTE_READ, "REMOTE_READ"),
              (FI_REMOTE_WRITE, "REMOTE_WRITE"), (FI_RMA_EVENT, "RMA_EVENT"),
              (FI_SOURCE, "SOURCE"), (FI_HMEM, "HMEM")]
_MR_MODE_NAMES = [(1 << 2, "LOCAL"), (1 << 3, "RAW"), (1 << 4, "VIRT_ADDR"), (1 << 5, "ALLOCATED"),
                  (1 << 6, "PROV_KEY"), (1 << 7, "MMU_NOTIFY"), (1 << 8, "RMA_EVENT"),
                  (1 << 9, "ENDPOINT"), (1 << 10, "HMEM")]
#: mr_mode bits the core honours (fabric_mr.h); a provider needing another one is not usable.
_MR_MODE_SUPPORTED = (1 << 2) | (1 << 4) | (1 << 5) | (1 << 6) | (1 << 9) | (1 << 10)
_PROGRESS = {0: "unspec", 1: "auto", 2: "manual"}


class _TxAttr(ctypes.Structure):
    _fields_ = [("caps", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("op_flags", ctypes.c_uint64), ("msg_order", ctypes.c_uint64),
                ("comp_order", ctypes.c_uint64), ("inject_size", ctypes.c_size_t),
                ("size", ctypes.c_size_t), ("iov_limit", ctypes.c_size_t),
                ("rma_iov_limit", ctypes.c_size_t)]


class _RxAttr(ctypes.Structure):
    _fields_ = [("caps", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("op_flags", ctypes.c_uint64), ("msg_order", ctypes.c_uint64),
                ("comp_order", ctypes.c_uint64), ("total_buffered_recv", ctypes.c_size_t),
                ("size", ctypes.c_size_t), ("iov_limit", ctypes.c_size_t)]


class _EpAttr(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("protocol", ctypes.c_uint32),
                ("protocol_version", ctypes.c_uint32), ("max_msg_size", ctypes.c_size_t)]


class _DomainAttr(ctypes.Structure):
    _fields_ = [("domain", ctypes.c_void_p), ("name", ctypes.c_char_p),
                ("threading", ctypes.c_int), ("control_progress", ctypes.c_int),
                ("data_progress", ctypes.c_int), ("resource_mgmt", ctypes.c_int),
                ("av_type", ctypes.c_int), ("mr_mode", ctypes.c_int),
                ("mr_key_size", ctypes.c_size_t), ("cq_data_size", ctypes.c_size_t)]


class _FabricAttr(ctypes.Structure):
    _fields_ = [("fabric", ctypes.c_void_p), ("name", ctypes.c_char_p),
                ("prov_name", ctypes.c_void_p), ("prov_version", ctypes.c_uint32),
                ("api_version", ctypes.c_uint32)]


class _Info(ctypes.Structure):
    pass


_Info._fields_ = [("next", ctypes.POINTER(_Info)), ("caps", ctypes.c_uint64),
                  ("mode", ctypes.c_uint64), ("addr_format", ctypes.c_uint32),
                  ("src_addrlen", ctypes.c_size_t), ("dest_addrlen", ctypes.c_size_t),
                  ("src_addr", ctypes.c_void_p), ("dest_addr", ctypes.c_void_p),
                  ("handle", ctypes.c_void_p), ("tx_attr", ctypes.POINTER(_TxAttr)),
                  ("rx_attr", ctypes.POINTER(_RxAttr)), ("ep_attr", ctypes.POINTER(_EpAttr)),
                  ("domain_attr", ctypes.POINTER(_DomainAttr)),
                  ("fabric_attr", ctypes.POINTER(_FabricAttr)), ("nic", ctypes.c_void_p)]


@dataclass(frozen=True)
class ProviderInfo:
    """One provider on one domain (NIC), as libfabric describes it for RDM endpoints."""

    name: str                 # "tcp;ofi_rxm"
    fabric: str
    domain: str
    caps: tuple[str, ...]
    mr_mode: tuple[str, ...]
    cq_data_size: int
    max_msg_size: int
    tx_depth: int
    iov_limit: int
    rma_iov_limit: int
    inject_size: int
    data_progress: str
    usable: bool              # the fabric transport can run on it
    why_not: str = ""         # when not usable
    rdma_read: bool = False
    hmem: bool = False

    def as_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


@dataclass
class _Probe:
    path: str | None = None
    version: str | None = None
    error: str | None = None
    providers: list[ProviderInfo] = field(default_factory=list)


_probe_lock = threading.Lock()
_probe: _Probe | None = None


def _mapped_libfabric() -> str | None:
    """A libfabric already mapped into this process (by the core or another library)."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.rsplit(None, 1)[-1] if "/" in line else ""
                if os.path.basename(path).startswith("libfabric.so"):
                    return path
    except OSError:
        pass
    return None


def libfabric_candidates() -> list[str]:
    """The files the core would try, in its order (fabric_loader.h)."""
    mapped = _mapped_libfabric()
    if mapped:
        return [mapped]
    wanted = os.environ.get(LIBFABRIC_ENV)
    if wanted:
        return [wanted]
    return [p for p in EFA_LIBFABRIC if os.path.exists(p)] + ["libfabric.so.1"]


def _load() -> tuple[ctypes.CDLL | None, str | None, str | None]:
    wanted = os.environ.get(LIBFABRIC_ENV)
    mapped = _mapped_libfabric()
    if mapped and wanted and os.path.realpath(wanted) != os.path.realpath(mapped):
        return None, None, (f"{LIBFABRIC_ENV}={wanted} but libfabric is already loaded from "
                            f"{mapped}; two copies cannot share the NICs")
    errors = []
    for path in libfabric_candidates():
        try:
            return ctypes.CDLL(path, mode=os.RTLD_LOCAL), path, None
        except OSError as e:
            errors.append(str(e))
    return None, None, "libfabric could not be loaded (" + "; ".join(errors) + ")"


def _describe(lib: ctypes.CDLL, version: int, read: bool) -> list[ProviderInfo]:
    """fi_getinfo for RDM endpoints; with ``read`` only providers that grant FI_READ."""
    lib.fi_dupinfo.restype = ctypes.POINTER(_Info)
    lib.fi_dupinfo.argtypes = [ctypes.c_void_p]
    lib.fi_getinfo.argtypes = [ctypes.c_uint32, ctypes.c_char_p, ctypes.c_char_p,
                               ctypes.c_uint64, ctypes.POINTER(_Info),
                               ctypes.POINTER(ctypes.POINTER(_Info))]
    lib.fi_freeinfo.argtypes = [ctypes.POINTER(_Info)]
    hints = lib.fi_dupinfo(None)
    if not hints:
        return []
    h = hints.contents
    h.caps = FI_MSG | FI_RMA | FI_WRITE | FI_REMOTE_WRITE | FI_SEND | FI_RECV
    if read:
        h.caps |= FI_READ | FI_REMOTE_READ
    h.mode = FI_CONTEXT | FI_CONTEXT2 | FI_RX_CQ_DATA | FI_ASYNC_IOV
    h.ep_attr.contents.type = FI_EP_RDM
    h.domain_attr.contents.mr_mode = _MR_MODE_SUPPORTED & ~(1 << 10)
    out = ctypes.POINTER(_Info)()
    rc = lib.fi_getinfo(version, None, None, 0, hints, ctypes.byref(out))
    lib.fi_freeinfo(hints)
    if rc != 0 or not out:
        return []
    infos = []
    cur = out
    while cur:
        infos.append(_snapshot(cur.contents, read))
        cur = cur.contents.next
    lib.fi_freeinfo(out)
    return infos


def _snapshot(i: _Info, read: bool) -> ProviderInfo:
    tx, dom, fab, ep = i.tx_attr.contents, i.domain_attr.contents, i.fabric_attr.contents, \
        i.ep_attr.contents
    prov = ctypes.cast(fab.prov_name, ctypes.c_char_p).value.decode()
    caps = tuple(n for bit, n in _CAP_NAMES if i.caps & bit)
    mr_mode = tuple(n for bit, n in _MR_MODE_NAMES if dom.mr_mode & bit)
    why = ""
    if dom.cq_data_size < 4:
        why = f"cq_data_size {dom.cq_data_size} < 4 (the 32-bit immediate)"
    elif dom.mr_mode & ~_MR_MODE_SUPPORTED:
        why = "needs an mr_mode kvtransfer does not honour (" + ", ".join(mr_mode) + ")"
    return ProviderInfo(
        name=prov, fabric=(fab.name or b"").decode(), domain=(dom.name or b"").decode(),
        caps=caps, mr_mode=mr_mode, cq_data_size=dom.cq_data_size, max_msg_size=ep.max_msg_size,
        tx_depth=tx.size, iov_limit=tx.iov_limit, rma_iov_limit=tx.rma_iov_limit,
        inject_size=tx.inject_size, data_progress=_PROGRESS.get(dom.data_progress, "?"),
        usable=not why, why_not=why, rdma_read=read and bool(i.caps & FI_READ),
        hmem=bool(i.caps & FI_HMEM))


def probe(refresh: bool = False) -> _Probe:
    """Loads libfabric (the core's copy) and lists its RDM providers with RMA; cached."""
    global _probe
    with _probe_lock:
        if _probe is not None and not refresh:
            return _probe
        p = _Probe()
        lib, path, err = _load()
        if lib is None:
            p.error = err
            _probe = p
            return p
        p.path = _mapped_libfabric() or path
        lib.fi_version.restype = ctypes.c_uint32
        v = lib.fi_version()
        p.version = f"{v >> 16}.{v & 0xFFFF}"
        api = min(v, (1 << 16) | 17)  # the core's headers are 1.17 or newer
        seen: dict[tuple[str, str, str], ProviderInfo] = {}
        for read in (True, False):
            for info in _describe(lib, api, read):
                seen.setdefault((info.name, info.fabric, info.domain), info)
        p.providers = list(seen.values())
        _probe = p
        return p


def fabric_providers() -> list[str]:
    """Names of the usable fabric providers here, best first (empty without libfabric)."""
    names: list[str] = []
    for info in probe().providers:
        if info.usable and info.name not in names:
            names.append(info.name)
    order = {n: i for i, n in enumerate(PROVIDER_PREFERENCE)}
    return sorted(names, key=lambda n: order.get(n, len(order)))


def canonical_provider(provider: str) -> str:
    """"tcp" -> "tcp;ofi_rxm" etc.; a ":DOMAIN,..." suffix is kept."""
    name, sep, domains = provider.partition(":")
    return PROVIDER_ALIASES.get(name, name) + sep + domains


def available() -> list[str]:
    """Core transports compiled into this build."""
    return list(_core.transports())


def rdma_devices() -> list[str]:
    """RDMA devices the kernel exposes (/sys/class/infiniband)."""
    try:
        return sorted(os.listdir("/sys/class/infiniband"))
    except OSError:
        return []


@dataclass(frozen=True)
class Choice:
    transport: str
    provider: str | None
    reason: str


def choose(transport: str, provider: str | None) -> Choice:
    """What ``Endpoint(transport=..., provider=...)`` will use, and why (no side effects
    beyond loading libfabric for the probe)."""
    names = available()
    if transport == "auto":
        if provider:
            if "fabric" not in names:
                raise InvalidRequestError(
                    f"provider={provider!r} needs the fabric transport, which this build lacks "
                    f"(built: {', '.join(names)})")
            return Choice("fabric", canonical_provider(provider), "a fabric provider was named")
        if "fabric" in names:
            offered = fabric_providers()
            if "efa" in offered:
                return Choice("fabric", "efa", "the efa provider (AWS Elastic Fabric Adapter) "
                              "is present")
        if "verbs" in names and rdma_devices():
            return Choice("verbs", None, "RDMA devices present: " + ", ".join(rdma_devices()))
        if "fabric" in names:
            hw = [n for n in fabric_providers() if n in HARDWARE_PROVIDERS]
            if hw:
                return Choice("fabric", hw[0], f"hardware fabric provider {hw[0]} is present")
            p = probe()
            why = (p.error if p.error else
                   "only software fabric providers here (" + (", ".join(fabric_providers())
                                                              or "none") + "), which are "
                   "slower than the native TCP transport")
        else:
            why = "this build has no fabric transport"
        return Choice("tcp", None, "no RDMA hardware: " + why)
    if transport not in names:
        raise InvalidRequestError(
            f"transport {transport!r} is not available in this build (built: {', '.join(names)})")
    if transport == "fabric":
        return Choice("fabric", canonical_provider(provider) if provider else None,
                      "asked for" if provider else "best available provider (core decides)")
    return Choice(transport, None, "asked for")


def resolve_transport(transport: str, provider: str | None) -> str:
    """The core transport name for ``Endpoint(transport=..., provider=...)``."""
    c = choose(transport, provider)
    if transport == "auto":
        log.info("transport='auto' picked %r%s: %s", c.transport,
                 f" (provider {c.provider!r})" if c.provider else "", c.reason)
    return c.transport
