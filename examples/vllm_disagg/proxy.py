"""A small prefill/decode proxy for two vLLM servers using KVTransferConnector (stdlib only).

POST /v1/completions (non-streaming) is sent the way P/D disaggregation needs:

- pull: to the prefill server with ``max_tokens=1`` and ``kv_transfer_params={"do_remote_decode":
  true}``; then to the decode server with the ``kv_transfer_params`` the prefill returned.
- push: to the decode server first (it allocates blocks and registers them with the prefill's
  kvtransfer endpoint), then to the prefill server, whose forward pass writes the KV layer by
  layer into the decode server's blocks; the decode server's answer is returned.

    python proxy.py --port 8000 --prefill http://127.0.0.1:8100 --decode http://127.0.0.1:8200 \
        [--mode push --prefill-kvt 127.0.0.1:14600]
"""

from __future__ import annotations

import argparse
import json
import threading
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def post(url: str, body: dict, timeout: float = 300.0) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


class PDProxy:
    def __init__(self, prefill: str, decode: str, mode: str = "pull",
                 prefill_kvt: str | None = None):
        if mode == "push" and not prefill_kvt:
            raise ValueError("push mode needs --prefill-kvt (the prefill's kvtransfer listen "
                             "address)")
        self.prefill, self.decode, self.mode, self.prefill_kvt = prefill, decode, mode, prefill_kvt
        self._pool = ThreadPoolExecutor(16)

    def complete(self, body: dict) -> dict:
        if body.get("stream"):
            raise ValueError("this example proxy does not stream")
        first = dict(body, max_tokens=1, stream=False)
        if self.mode == "pull":
            first["kv_transfer_params"] = {"do_remote_decode": True}
            params = post(self.prefill + "/v1/completions", first)["kv_transfer_params"]
            return post(self.decode + "/v1/completions", dict(body, kv_transfer_params=params))
        xfer = uuid.uuid4().hex
        decoded = self._pool.submit(post, self.decode + "/v1/completions", dict(
            body, kv_transfer_params={"do_remote_prefill": True, "kvt_mode": "push",
                                      "transfer_id": xfer, "remote_address": self.prefill_kvt}))
        time.sleep(0.05)  # let the decode server register first, so the push can stream
        first["kv_transfer_params"] = {"do_remote_decode": True, "kvt_mode": "push",
                                       "transfer_id": xfer}
        post(self.prefill + "/v1/completions", first)
        return decoded.result()

    def serve(self, host: str, port: int) -> ThreadingHTTPServer:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                if self.path != "/v1/completions":
                    return self._reply(404, {"error": f"no route {self.path}"})
                try:
                    body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                    self._reply(200, proxy.complete(body))
                except urllib.error.HTTPError as e:
                    self._reply(e.code, {"error": e.read().decode(errors="replace")})
                except Exception as e:  # noqa: BLE001 - report, keep serving
                    self._reply(502, {"error": f"{type(e).__name__}: {e}"})

            def do_GET(self):  # noqa: N802
                self._reply(200, {"ok": True}) if self.path == "/health" else \
                    self._reply(404, {"error": f"no route {self.path}"})

            def _reply(self, code: int, obj: dict) -> None:
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):  # quiet
                pass

        server = ThreadingHTTPServer((host, port), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--prefill", required=True, help="prefill server URL")
    ap.add_argument("--decode", required=True, help="decode server URL")
    ap.add_argument("--mode", choices=["pull", "push"], default="pull")
    ap.add_argument("--prefill-kvt", help="push: the prefill's kvtransfer host:port")
    args = ap.parse_args()
    server = PDProxy(args.prefill, args.decode, args.mode, args.prefill_kvt).serve(args.host,
                                                                                   args.port)
    print(f"P/D proxy ({args.mode}) on http://{args.host}:{args.port}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.shutdown()


if __name__ == "__main__":
    main()
