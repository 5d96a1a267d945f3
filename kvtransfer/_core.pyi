"""
kvtransfer C++ core (private; use the kvtransfer package)
"""
from __future__ import annotations
import collections.abc
import numpy
import numpy.typing
import typing
__all__: list[str] = ['Endpoint', 'KV_FILE_VERSION', 'KV_PREAMBLE_BYTES', 'KV_RECORD_HEADER_BYTES', 'KV_RECORD_TRAILER_BYTES', 'MAX_NOTIFY_BYTES', 'PROTOCOL_VERSION', 'Peer', 'PlaneSet', 'Transfer', 'crc32c', 'decode_control', 'decode_data_frame', 'decode_info', 'decode_kv_header', 'decode_message', 'decode_note', 'decode_ticket', 'encode_control', 'encode_data_frame', 'encode_info', 'encode_kv_header', 'encode_note', 'encode_ticket', 'error_class_name', 'kv_header_length', 'note_prefix', 'open_kv_record', 'plan_segments', 'seal_kv_record', 'tcp_oneway_seconds', 'transports']
class Transfer:
    def wait(self, timeout: typing.SupportsFloat | typing.SupportsIndex) -> bool:
        """
        Blocks until the transfer ends or timeout (s, negative: none); True if it ended.
        """
    @property
    def code(self) -> int:
        ...
    @property
    def error(self) -> str:
        ...
    @property
    def id(self) -> int:
        ...
    @property
    def latency_s(self) -> float:
        ...
    @property
    def nbytes(self) -> int:
        ...
    @property
    def status(self) -> int:
        ...
class Peer:
    @property
    def address(self) -> str:
        ...
    @property
    def alive(self) -> bool:
        ...
    @property
    def name(self) -> str:
        ...
class Endpoint:
    def __init__(self, name: str, transport: str, listen: str, auth_token: str, timeout: typing.SupportsFloat | typing.SupportsIndex, connections: typing.SupportsInt | typing.SupportsIndex, provider: str, checksum: bool, faults: str = '') -> None:
        ...
    def cancel(self, transfer: Transfer) -> bool:
        ...
    def caps(self) -> dict:
        ...
    def close(self) -> None:
        ...
    def connect(self, target: bytes, timeout: typing.SupportsFloat | typing.SupportsIndex) -> Peer:
        ...
    def deregister(self, id: typing.SupportsInt | typing.SupportsIndex, timeout: typing.SupportsFloat | typing.SupportsIndex) -> None:
        ...
    def disconnect(self, peer: Peer) -> None:
        ...
    def errors(self) -> list:
        ...
    def info(self) -> bytes:
        ...
    def notifications(self, timeout: typing.SupportsFloat | typing.SupportsIndex = 0.0) -> list:
        ...
    def peer_regions(self, peer: Peer, timeout: typing.SupportsFloat | typing.SupportsIndex) -> dict[int, int]:
        ...
    def refuse_inbound(self, prefix: bytes, reason: str) -> None:
        ...
    def register(self, addr: typing.SupportsInt | typing.SupportsIndex, nbytes: typing.SupportsInt | typing.SupportsIndex, remote_write: bool, remote_read: bool) -> int:
        ...
    def stats(self) -> dict:
        ...
    def transfer(self, is_write: bool, peer: Peer, local: typing.SupportsInt, remote: typing.SupportsInt, segments: typing.Any, notify: typing.Any, timeout: typing.SupportsFloat, checksum: typing.SupportsInt) -> Transfer:
        """
        Starts a write (is_write) or read of segments, rows of (src_off, dst_off, len), between local region `local` and the peer's region `remote`; notify: bytes or None; timeout: seconds (0: the endpoint's); checksum: -1 (the endpoint's), 0 or 1.
        """
    def wait_notification(self, payload: typing.Any, timeout: typing.SupportsFloat | typing.SupportsIndex, spin: typing.SupportsFloat | typing.SupportsIndex = 0.0) -> typing.Any:
        ...
    @property
    def address(self) -> str:
        ...
    @property
    def name(self) -> str:
        ...
class PlaneSet:
    """
    One side's KV-cache geometry: per plane (layer, K/V part) a buffer and offset.
    """
    def __init__(self, num_blocks: typing.SupportsInt | typing.SupportsIndex, block_size: typing.SupportsInt | typing.SupportsIndex, num_heads: typing.SupportsInt | typing.SupportsIndex, head_bytes: typing.SupportsInt | typing.SupportsIndex, block_stride: typing.SupportsInt | typing.SupportsIndex, token_stride: typing.SupportsInt | typing.SupportsIndex, head_stride: typing.SupportsInt | typing.SupportsIndex, planes: typing.Annotated[numpy.typing.ArrayLike, numpy.int64], buffer_nbytes: typing.Annotated[numpy.typing.ArrayLike, numpy.int64]) -> None:
        ...
    @property
    def block_size(self) -> int:
        ...
    @property
    def num_blocks(self) -> int:
        ...
    @property
    def num_heads(self) -> int:
        ...
    @property
    def num_planes(self) -> int:
        ...
def _wire_bench(kind: str, n: typing.SupportsInt | typing.SupportsIndex) -> float:
    """
    Seconds to run n encodes or decodes of a typical frame in C++ (benchmarks only).
    """
def crc32c(data: typing.Any, crc: typing.SupportsInt | typing.SupportsIndex = 0) -> int:
    """
    CRC-32C of a bytes-like object, extending crc (hardware-accelerated where available).
    """
def decode_control(frame: typing.Any) -> tuple[int, int, bytes]:
    """
    (type, version, body) of one whole control frame; checks its crc32c.
    """
def decode_data_frame(raw: typing.Any) -> dict:
    """
    Header fields and descriptors of a data frame (header + descriptors); checks its crc32c.
    """
def decode_info(blob: typing.Any) -> dict:
    """
    The fields of an endpoint info blob (ep.info()).
    """
def decode_kv_header(raw: typing.Any) -> dict:
    """
    The fields of a KV file header (checked: crc, caps, geometry).
    """
def decode_message(type: typing.SupportsInt | typing.SupportsIndex, body: typing.Any) -> dict:
    """
    The fields of a control message body, as a dict.
    """
def decode_note(payload: bytes) -> typing.Any:
    ...
def decode_ticket(ticket: bytes) -> dict:
    ...
def encode_control(type: typing.SupportsInt | typing.SupportsIndex, body: typing.Any) -> bytes:
    """
    A control frame (16-byte header + body).
    """
def encode_data_frame(type: typing.SupportsInt | typing.SupportsIndex, slot: typing.SupportsInt | typing.SupportsIndex, region: typing.SupportsInt | typing.SupportsIndex = 0, key: typing.SupportsInt | typing.SupportsIndex = 0, frame: typing.SupportsInt | typing.SupportsIndex = 0, payload: typing.SupportsInt | typing.SupportsIndex = 0, flags: typing.SupportsInt | typing.SupportsIndex = 0, descs: collections.abc.Sequence[tuple[typing.SupportsInt | typing.SupportsIndex, typing.SupportsInt | typing.SupportsIndex]] = []) -> bytes:
    """
    A data frame's header and descriptors (the payload is not included).
    """
def encode_info(name: str, address: str, transport: str, regions: collections.abc.Sequence[tuple[typing.SupportsInt | typing.SupportsIndex, typing.SupportsInt | typing.SupportsIndex]]) -> bytes:
    ...
def encode_kv_header(header: dict) -> bytes:
    """
    A KV file header from its fields (checked as a reader would).
    """
def encode_note(kind: str, request_id: bytes, src_rank: typing.SupportsInt | typing.SupportsIndex, n_sources: typing.SupportsInt | typing.SupportsIndex, layer_begin: typing.SupportsInt | typing.SupportsIndex, layer_end: typing.SupportsInt | typing.SupportsIndex, group: typing.SupportsInt | typing.SupportsIndex, n_groups: typing.SupportsInt | typing.SupportsIndex) -> bytes:
    ...
def encode_ticket(kind: str, request_id: bytes, endpoint_info: bytes, tp_rank: typing.SupportsInt | typing.SupportsIndex, tp_size: typing.SupportsInt | typing.SupportsIndex, fingerprint: bytes, descriptor: bytes, regions: collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex], blocks: typing.Annotated[numpy.typing.ArrayLike, numpy.int64], timeout_ms: typing.SupportsInt | typing.SupportsIndex) -> bytes:
    ...
def error_class_name(arg0: typing.SupportsInt | typing.SupportsIndex) -> str:
    ...
def kv_header_length(preamble: typing.Any) -> int:
    """
    Total header bytes announced by a KV file's first 12 bytes.
    """
def note_prefix(request_id: bytes) -> bytes:
    ...
def open_kv_record(record: typing.Any, seq: typing.SupportsInt | typing.SupportsIndex) -> int:
    """
    Checks a KV record (magic, sequence, crc32c); returns its source block id.
    """
def plan_segments(src: PlaneSet, dst: PlaneSet, src_blocks: typing.Annotated[numpy.typing.ArrayLike, numpy.int64], dst_blocks: typing.Annotated[numpy.typing.ArrayLike, numpy.int64], plane_begin: typing.SupportsInt | typing.SupportsIndex = 0, plane_end: typing.SupportsInt | typing.SupportsIndex = -1, src_head: typing.SupportsInt | typing.SupportsIndex = 0, num_heads: typing.SupportsInt | typing.SupportsIndex = -1, dst_head: typing.SupportsInt | typing.SupportsIndex = 0, num_tokens: typing.SupportsInt | typing.SupportsIndex = -1) -> tuple[numpy.typing.NDArray[numpy.int64], numpy.typing.NDArray[numpy.int64], int]:
    """
    Coalesced (src_off, dst_off, len) segments moving the given blocks, planes and heads;
    returns (segments int64 [N, 3], groups int64 [G, 4] = (src_buffer, dst_buffer, begin, end),
    nbytes).
    """
def seal_kv_record(record: typing.Any, seq: typing.SupportsInt | typing.SupportsIndex, source_block: typing.SupportsInt | typing.SupportsIndex) -> None:
    """
    Writes a KV record's header and crc32c into a buffer holding its scales and data.
    """
def tcp_oneway_seconds(nbytes: typing.SupportsInt | typing.SupportsIndex, reps: typing.SupportsInt | typing.SupportsIndex, gap_us: typing.SupportsInt | typing.SupportsIndex, busy: bool) -> list[float]:
    """
    One-way times (s) of `reps` messages of `nbytes` between two threads over loopback TCP, bare sockets: the kernel's floor for the latency rows. The sender waits gap_us before each (asleep, or spinning when busy).
    """
def transports() -> list[str]:
    """
    Transports compiled into this build.
    """
KV_FILE_VERSION: int = 1
KV_PREAMBLE_BYTES: int = 12
KV_RECORD_HEADER_BYTES: int = 16
KV_RECORD_TRAILER_BYTES: int = 4
MAX_NOTIFY_BYTES: int = 4096
PROTOCOL_VERSION: int = 2
