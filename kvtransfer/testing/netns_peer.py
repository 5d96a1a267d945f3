"""A peer driven over stdin/stdout (JSON lines), for tests that run it in another network
namespace (`ip netns exec NS python -m kvtransfer.testing.netns_peer target|initiator ...`).

target:    --listen HOST:PORT --nbytes N        prints {"info", "region"}, then answers
           {"wait": payload, "seed", "block_bytes", "blocks"} with {"ok": verified} or {"error"}
initiator: --connect INFO_HEX                    answers {"write": payload, "region", "seed",
           "block_bytes", "dst_blocks"} with {"writing": true} as it starts, then
           {"done": seconds} or {"error"}
Either stops at end of input. ``--transport`` picks the transport (default tcp).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

import kvtransfer as kvt
from kvtransfer.testing.peers import block_segments, pattern


def _say(**msg) -> None:
    print(json.dumps(msg), flush=True)


def _target(args) -> None:
    with kvt.Endpoint("netns-target", transport=args.transport, listen=args.listen,
                      timeout=args.timeout) as ep:
        buf = np.zeros(args.nbytes, np.uint8)
        region = ep.register(buf, remote_write=True)
        _say(info=ep.info().hex(), region=region.id)
        for line in sys.stdin:
            cmd = json.loads(line)
            try:
                ep.wait_notification(bytes.fromhex(cmd["wait"]), timeout=args.timeout * 2)
            except kvt.KVTransferError as e:
                _say(error=type(e).__name__, message=str(e))
                continue
            bs, blocks = cmd["block_bytes"], np.asarray(cmd["blocks"])
            want = pattern(cmd["seed"], len(blocks) * bs).reshape(-1, bs)
            _say(ok=bool(np.array_equal(buf.reshape(-1, bs)[blocks], want)))


def _initiator(args) -> None:
    with kvt.Endpoint("netns-initiator", transport=args.transport, listen=args.listen,
                      timeout=args.timeout) as ep:
        peer = ep.connect(bytes.fromhex(args.connect))
        _say(connected=True)
        for line in sys.stdin:
            cmd = json.loads(line)
            bs, dst = cmd["block_bytes"], cmd["dst_blocks"]
            src = ep.register(pattern(cmd["seed"], len(dst) * bs))
            _say(writing=True)  # the source is ready: the transfer starts now
            t0 = time.monotonic()
            try:
                if not peer.alive:
                    peer = ep.connect(bytes.fromhex(args.connect))
                ep.write(peer, src, cmd["region"], block_segments(range(len(dst)), dst, bs),
                         notify=bytes.fromhex(cmd["write"])).wait(args.timeout * 2)
                _say(done=time.monotonic() - t0)
            except kvt.KVTransferError as e:
                _say(error=type(e).__name__, message=str(e), after=time.monotonic() - t0)
            src.close()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("role", choices=["target", "initiator"])
    ap.add_argument("--listen", default="0.0.0.0:0")
    ap.add_argument("--nbytes", type=int, default=64 << 20)
    ap.add_argument("--connect", default="")
    ap.add_argument("--timeout", type=float, default=3.0)
    ap.add_argument("--transport", default="tcp")
    args = ap.parse_args(argv)
    (_target if args.role == "target" else _initiator)(args)


if __name__ == "__main__":
    main()
