"""A fault-injecting HTTP proxy in front of the GCS emulator: the misbehaving cloud in a test.

Everything the project sends to a bucket (gcsfs through etils.epath, TensorStore through Orbax)
goes to ``STORAGE_EMULATOR_HOST`` / ``TENSORSTORE_GCS_HTTP_URL``; point both at this proxy and
it forwards to the emulator, except for a seeded fraction ``rate`` of requests, which get one of

* ``503``: "Service Unavailable", the store never sees the request;
* ``429``: "Too Many Requests", likewise;
* ``drop_before``: the connection is closed before the request is forwarded;
* ``drop_after``: the request is forwarded, the store applies it, then the connection is closed
  without a response (the client cannot tell whether its write happened).

A dropped answer to the last PUT of a resumable upload leaves the object complete; the client
then asks the session again. GCS answers that with the object (200/201, "If the upload is
already complete"); fake-gcs-server has forgotten the session and answers 404, which gcsfs takes
for a missing object. The proxy keeps the answers it dropped and replays them for such a repeat,
as GCS would (counted as ``replayed``).

``fail_matching`` (a substring of ``METHOD /path?query``) fails every matching request with a
503: a fault that outlasts any retry budget. Faults only hit requests whose line contains
``only_matching`` (default: all).

Run it as a process (the tests do, so the proxy keeps serving while they kill trainers):
``python tests/fault_proxy.py --upstream http://127.0.0.1:PORT [--rate 0.05 --seed 0]`` prints
``PROXY http://127.0.0.1:PORT`` when ready. ``POST /__fault_proxy__/config`` (JSON with any of
rate, seed, kinds, fail_matching, only_matching) changes the settings; ``GET
/__fault_proxy__/stats`` returns the counts of requests and of each fault injected, ``GET
/__fault_proxy__/requests`` the last 10,000 requests as ``[request line, User-Agent, fault or
null]`` (``requests(url)``).
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import http.client
import http.server
import json
import re
import socket
import sys
import threading
import urllib.parse
import urllib.request

KINDS = ("503", "429", "drop_before", "drop_after")
CONTROL = "/__fault_proxy__/"
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
               "proxy-connection", "content-length"}  # fmt: skip


class FaultState:
    """The settings and counters, shared by the handler threads."""

    def __init__(self, upstream: str, *, rate: float = 0.0, seed: int = 0, kinds=KINDS):
        self.upstream = urllib.parse.urlsplit(upstream)
        self.lock = threading.Lock()
        self.configure(rate=rate, seed=seed, kinds=list(kinds), fail_matching="", only_matching="")
        self.stats = {"requests": 0, **{k: 0 for k in KINDS}, "persistent": 0, "replayed": 0}
        self.completed_uploads: dict[str, tuple] = {}  # upload_id -> the dropped answer
        self.recent = collections.deque(maxlen=10000)  # [request line, user agent, fault]

    def configure(self, **settings) -> None:
        with self.lock:
            for key, value in settings.items():
                if key == "seed":
                    self.seed, self.seen = int(value), {}
                elif key == "kinds":
                    unknown = set(value) - set(KINDS)
                    if unknown:
                        raise ValueError(f"fault_proxy: unknown fault kinds {sorted(unknown)}")
                    self.kinds = list(value)
                elif key == "rate":
                    self.rate = float(value)
                elif key in ("fail_matching", "only_matching"):
                    setattr(self, key, str(value))
                else:
                    raise ValueError(f"fault_proxy: unknown setting {key!r}")

    def decide(self, request_line: str, agent: str = "") -> str | None:
        fault = self._decide(request_line)
        with self.lock:
            self.recent.append([request_line, agent, fault])
        return fault

    def _decide(self, request_line: str) -> str | None:
        """The fault for this request (None: forward it untouched).

        Drawn from a hash of (seed, request line without its upload session id, how often
        that line was seen), not from one random stream: clients send requests from many
        threads in varying order, and each request still meets the same fate in every run.
        """
        key = re.sub(r"upload_id=[^&]*", "upload_id=", request_line)
        with self.lock:
            self.stats["requests"] += 1
            if self.fail_matching and self.fail_matching in request_line:
                self.stats["persistent"] += 1
                return "503"
            if self.only_matching and self.only_matching not in request_line:
                return None
            seen = self.seen[key] = self.seen.get(key, 0) + 1
            draw = hashlib.sha256(f"{self.seed}|{key}|{seen}".encode()).digest()
            if self.rate > 0 and int.from_bytes(draw[:8], "big") / 2.0**64 < self.rate:
                kind = self.kinds[draw[8] % len(self.kinds)]
                self.stats[kind] += 1
                return kind
            return None


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the clients expect from GCS
    state: FaultState

    def log_message(self, *args):  # quiet
        pass

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _reply(self, status: int, body: bytes, headers=()) -> None:
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _drop(self) -> None:
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _control(self, body: bytes) -> None:
        if self.path.startswith(CONTROL + "requests"):
            with self.state.lock:
                recent = json.dumps(list(self.state.recent)).encode()
            self._reply(200, recent, [("Content-Type", "application/json")])
            return
        if self.command == "POST" and self.path.startswith(CONTROL + "config"):
            try:
                self.state.configure(**json.loads(body or b"{}"))
            except (ValueError, TypeError) as err:
                self._reply(400, str(err).encode())
                return
        with self.state.lock:
            stats = json.dumps(self.state.stats).encode()
        self._reply(200, stats, [("Content-Type", "application/json")])

    def _forward(self, body: bytes):
        up = self.state.upstream
        conn = http.client.HTTPConnection(up.hostname, up.port, timeout=120)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        headers["Content-Length"] = str(len(body))
        try:
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            payload = resp.read()
            return resp.status, payload, resp.getheaders()
        finally:
            conn.close()

    def _upload_id(self) -> str | None:
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
        return query.get("upload_id", [None])[0] if self.command == "PUT" else None

    def _handle(self) -> None:
        body = self._read_body()
        if self.path.startswith(CONTROL):
            self._control(body)
            return
        upload_id = self._upload_id()
        with self.state.lock:
            replay = self.state.completed_uploads.get(upload_id) if upload_id else None
            if replay:
                self.state.stats["replayed"] += 1
        if replay:
            self._reply(*replay)
            return
        agent = self.headers.get("User-Agent", "")
        fault = self.state.decide(f"{self.command} {self.path}", agent)
        if fault in ("503", "429"):
            reason = b'{"error": {"code": %s, "message": "injected by fault_proxy"}}' % (
                fault.encode()
            )
            self._reply(int(fault), reason, [("Content-Type", "application/json")])
            return
        if fault == "drop_before":
            self._drop()
            return
        try:
            status, payload, headers = self._forward(body)
        except OSError as err:
            self._reply(502, f"fault_proxy: upstream failed: {err}".encode())
            return
        up = self.state.upstream.netloc
        own = f"{self.server.server_address[0]}:{self.server.server_address[1]}"
        out = [(k, v.replace(up, own)) for k, v in headers if k.lower() not in _HOP_BY_HOP]
        if fault == "drop_after":
            if upload_id and status in (200, 201):
                with self.state.lock:
                    self.state.completed_uploads[upload_id] = (status, payload, out)
            self._drop()
            return
        self._reply(status, payload, out)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _handle


class FaultProxy:
    """In-process proxy (``with FaultProxy(upstream) as proxy: proxy.url``)."""

    def __init__(self, upstream: str, *, rate: float = 0.0, seed: int = 0, kinds=KINDS,
                 port: int = 0):  # fmt: skip
        self.state = FaultState(upstream, rate=rate, seed=seed, kinds=kinds)
        handler = type("Handler", (_Handler,), {"state": self.state})
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
        self.server.daemon_threads = True
        self.server.handle_error = lambda request, client_address: None  # clients hang up
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def control(url: str, **settings) -> dict:
    """Changes a running proxy's settings (none: only reads); returns its counters."""
    if settings:
        request = urllib.request.Request(
            f"{url}{CONTROL}config", data=json.dumps(settings).encode(), method="POST"
        )
    else:
        request = urllib.request.Request(f"{url}{CONTROL}stats")
    with urllib.request.urlopen(request, timeout=10) as resp:
        return json.loads(resp.read())


def requests(url: str) -> list[list]:
    """The proxy's recent requests: ``[request line, User-Agent, fault or None]``, oldest
    first."""
    with urllib.request.urlopen(f"{url}{CONTROL}requests", timeout=10) as resp:
        return json.loads(resp.read())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True, help="the GCS emulator's URL")
    parser.add_argument("--rate", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    proxy = FaultProxy(args.upstream, rate=args.rate, seed=args.seed,
                       kinds=args.kinds.split(","), port=args.port)  # fmt: skip
    print(f"PROXY {proxy.url}", flush=True)
    proxy.server.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
