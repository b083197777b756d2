"""A fault-injecting HTTP front for object storage in tests and benchmarks: S3 (in front of moto's
``ThreadedMotoServer``) and GCS (in front of a GCS emulator, ``tests/fake_gcs.py``).

``FaultFront(upstream, faults)`` listens on a free loopback port in a thread of its own (an aiohttp server on
its own event loop), forwards every request to ``upstream`` and, per request, with a seeded RNG:

- ``latency``: waits ``latency`` (+ uniform ``jitter``) seconds before forwarding (S3's ~60 ms per request);
- ``slowdown``: answers 503 without forwarding (S3: ``SlowDown``; GCS: its JSON 503), which clients retry;
- ``reset``: resets the connection (TCP RST) without forwarding: the request never reached the store;
- ``lost_answer``: for writes (PUT, POST, DELETE, PATCH) forwards the request, lets it land, then resets the
  connection instead of answering: the client retries a write that already happened (a create retried into
  412, a delete into 404).

``counts`` holds the requests seen and the faults injected by kind. Everything is bounded: the body size,
the upstream's answer time (``upstream_timeout``), the start and the stop (``start()``/``stop()`` wait at most
``start_timeout`` seconds; the front is a context manager). ``set(**faults)`` changes the faults while it
runs (e.g. ``set(latency=0.06)``); ``match`` limits faults (not latency) to requests whose path and query
(decoded: GCS names objects in the query of an upload) match a regex.

    with moto_server(env) as moto_url, FaultFront(moto_url, Faults(latency=0.06)) as front:
        os.environ["AWS_ENDPOINT_URL"] = front.url      # clients now go through the front
        ...
        print(front.counts)   # {'requests': 812, 'latency': 812, 'slowdown': 0, 'reset': 0, 'lost_answer': 0}
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import random
import re
import socket
import struct
import threading
import urllib.parse

WRITES = frozenset({"PUT", "POST", "DELETE", "PATCH"})
KINDS = ("latency", "slowdown", "reset", "lost_answer")
# hop-by-hop and framing headers: aiohttp recomputes them on each side
_DROP_REQUEST = frozenset({"host", "content-length", "transfer-encoding", "connection", "keep-alive", "expect"})
_DROP_RESPONSE = frozenset({"content-length", "transfer-encoding", "connection", "keep-alive", "content-encoding",
                            "date", "server"})
_S3_SLOWDOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
                b"<Message>Please reduce your request rate.</Message><RequestId>FAULTFRONT</RequestId></Error>")
_GCS_503 = json.dumps({"error": {"code": 503, "message": "Backend Error (fault front)",
                                 "errors": [{"reason": "backendError", "message": "Backend Error"}]}}).encode()


@dataclasses.dataclass
class Faults:
    latency: float = 0.0        # seconds added to every request
    jitter: float = 0.0         # plus uniform(0, jitter) seconds
    slowdown: float = 0.0       # probability of a 503 (not forwarded)
    reset: float = 0.0          # probability of a connection reset (not forwarded)
    lost_answer: float = 0.0    # probability, for writes, of forwarding and then resetting instead of answering
    match: str | None = None    # regex on the path: only matching requests get slowdown/reset/lost_answer
    seed: int = 0


class FaultFront:
    def __init__(self, upstream: str, faults: Faults | None = None, *, flavor: str = "s3",
                 upstream_timeout: float = 60.0, start_timeout: float = 30.0, max_body: int = 256 << 20):
        if flavor not in ("s3", "gcs"):
            raise ValueError(f"flavor must be 's3' or 'gcs', not {flavor!r}")
        self.upstream = upstream.rstrip("/")
        self.faults = faults or Faults()
        self.flavor = flavor
        self.upstream_timeout, self.start_timeout, self.max_body = upstream_timeout, start_timeout, max_body
        self.counts: collections.Counter = collections.Counter({k: 0 for k in ("requests", *KINDS)})
        self._rng = random.Random(self.faults.seed)
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stopping: asyncio.Event | None = None
        self._error: BaseException | None = None
        self.port: int | None = None

    # ------------------------------------------------------------------------------------------ control
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def set(self, **changes) -> None:
        """Change the faults while the front runs (``seed`` restarts the RNG)."""
        with self._lock:
            self.faults = dataclasses.replace(self.faults, **changes)
            if "seed" in changes:
                self._rng = random.Random(self.faults.seed)

    def injected(self) -> dict:
        """Faults injected so far by kind (latency: requests delayed)."""
        with self._lock:
            return {k: self.counts[k] for k in KINDS}

    def start(self) -> "FaultFront":
        self._thread = threading.Thread(target=self._serve, name="fault-front", daemon=True)
        self._thread.start()
        if not self._ready.wait(self.start_timeout) or self._error is not None:
            self.stop()
            raise RuntimeError(f"fault front did not start: {self._error!r}")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stopping is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(self._stopping.set)
            except RuntimeError:
                pass
        if self._thread is not None:
            self._thread.join(self.start_timeout)
            self._thread = None

    def __enter__(self) -> "FaultFront":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------------------------------- server
    def _serve(self) -> None:
        self._loop = asyncio.new_event_loop()
        try:
            self._loop.run_until_complete(self._main())
        except BaseException as e:  # noqa: BLE001 - reported by start()
            self._error = e
            self._ready.set()
        finally:
            self._loop.close()

    async def _main(self) -> None:
        import aiohttp
        from aiohttp import web

        self._stopping = asyncio.Event()
        timeout = aiohttp.ClientTimeout(total=self.upstream_timeout)
        session = aiohttp.ClientSession(timeout=timeout, auto_decompress=False,
                                        connector=aiohttp.TCPConnector(limit=256))
        app = web.Application(client_max_size=self.max_body)
        async def handle(request):
            return await self._handle(request, session)

        app.router.add_route("*", "/{tail:.*}", handle)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        site = web.SockSite(runner, sock)
        await site.start()
        self._ready.set()
        try:
            await self._stopping.wait()
        finally:
            await runner.cleanup()
            await session.close()

    def _draw(self, request) -> tuple[float, str | None]:
        """The delay and the fault (or None) for this request, under the lock (one RNG, seeded)."""
        with self._lock:
            f, rng = self.faults, self._rng
            self.counts["requests"] += 1
            delay = f.latency + (rng.uniform(0, f.jitter) if f.jitter else 0.0)
            if delay > 0:
                self.counts["latency"] += 1
            if f.match is not None and not re.search(f.match, urllib.parse.unquote(request.rel_url.raw_path_qs)):
                return delay, None
            x = rng.random()
            for kind, p in (("slowdown", f.slowdown), ("reset", f.reset),
                            ("lost_answer", f.lost_answer if request.method in WRITES else 0.0)):
                if x < p:
                    self.counts[kind] += 1
                    return delay, kind
                x -= p
            return delay, None

    @staticmethod
    def _reset(request) -> None:
        """Cut the connection with a TCP RST (SO_LINGER 0), as a crashed load balancer does."""
        transport = request.transport
        if transport is None:
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
        transport.abort()

    async def _handle(self, request, session):
        from aiohttp import web

        delay, fault = self._draw(request)
        try:
            body = await request.read()
        except Exception:  # noqa: BLE001 - the client went away mid-body (a killed writer): nothing to answer
            self._reset(request)
            raise asyncio.CancelledError from None
        if delay > 0:
            await asyncio.sleep(delay)
        if fault == "slowdown":
            if self.flavor == "s3":
                return web.Response(status=503, body=_S3_SLOWDOWN, content_type="application/xml")
            return web.Response(status=503, body=_GCS_503, content_type="application/json")
        if fault == "reset":
            self._reset(request)
            raise asyncio.CancelledError  # nothing is answered on a reset connection
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _DROP_REQUEST]
        async with session.request(request.method, self.upstream + request.rel_url.raw_path_qs,
                                   headers=headers, data=body if body else None, allow_redirects=False,
                                   skip_auto_headers=("Content-Type", "User-Agent", "Accept-Encoding",
                                                      "Accept")) as up:
            data = await up.read()
            if fault == "lost_answer":  # the write landed upstream; its answer never reaches the client
                self._reset(request)
                raise asyncio.CancelledError
            out = web.Response(status=up.status, body=data if request.method != "HEAD" else None)
            for k, v in up.headers.items():
                if k.lower() not in _DROP_RESPONSE:
                    out.headers.add(k, v)
            if "Content-Encoding" in up.headers:
                out.headers["Content-Encoding"] = up.headers["Content-Encoding"]
            if request.method == "HEAD" and "Content-Length" in up.headers:
                out.headers["Content-Length"] = up.headers["Content-Length"]
            return out


def main(argv=None) -> None:
    """``python tests/fault_front.py UPSTREAM [--latency 0.06 ...]``: a front in a process of its own (away from
    the GIL of a benchmark's client threads). Prints ``url <URL>`` on its first line, then runs until stdin
    closes or SIGTERM, then prints ``counts <json>``."""
    import argparse
    import signal
    import sys

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("upstream")
    p.add_argument("--flavor", default="s3", choices=["s3", "gcs"])
    for f in dataclasses.fields(Faults):
        p.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, default=f.default,
                       type=str if f.name == "match" else int if f.name == "seed" else float)
    args = p.parse_args(argv)
    faults = Faults(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Faults)})
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
    with FaultFront(args.upstream, faults, flavor=args.flavor) as front:
        print("url", front.url, flush=True)
        done.wait()
    print("counts", json.dumps(dict(front.counts)), flush=True)


if __name__ == "__main__":
    main()
