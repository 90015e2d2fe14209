"""Builders for deliberately broken SA-1B input."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from sculpt.testing import samples


def photo(name="chelsea"):
    return samples.photo(name)


def encoded(image: np.ndarray | Image.Image, fmt="JPEG", **options) -> bytes:
    image = image if isinstance(image, Image.Image) else Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def exif_rotated_jpeg(image: np.ndarray, orientation: int = 6) -> bytes:
    """Pixels stored as given, with an EXIF tag saying 'rotate for display'."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encoded(image, exif=exif.tobytes())


def bomb_jpeg(width=40000, height=40000) -> bytes:
    """A tiny JPEG whose header claims width×height pixels (SOF0 patched)."""
    data = bytearray(encoded(np.zeros((8, 8, 3), np.uint8)))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


def pair(image_id: int, image_bytes: bytes, width=8, height=8, prefix="./"):
    meta = samples.sa1b_json(image_id, np.zeros((height, width, 3), np.uint8))
    return [(f"{prefix}sa_{image_id}.jpg", image_bytes), (f"{prefix}sa_{image_id}.json", meta)]


class FaultProxy:
    """An HTTP proxy on 127.0.0.1 in front of the test S3 server that cuts responses short, as a flaky network does.

    Responses to GETs whose path contains ``match`` are cut after half their body and the connection is dropped,
    the first ``cuts`` times; everything else passes through. ``cut`` counts the faults served.
    """

    def __init__(self, upstream: str, match: str, cuts: int):
        import http.client
        import socket
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import urlparse

        proxy = self
        self.match, self.cuts, self.cut = match, cuts, 0
        self.lock = threading.Lock()
        host = urlparse(upstream).netloc

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _body(self):
                if "chunked" in self.headers.get("Transfer-Encoding", ""):
                    data = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        data += self.rfile.read(size)
                        self.rfile.readline()
                        if size == 0:
                            return data
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _forward(self):
                body = self._body()
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("transfer-encoding", "content-length")}
                upstream_conn = http.client.HTTPConnection(host, timeout=30)
                upstream_conn.request(self.command, self.path, body=body, headers=headers)
                response = upstream_conn.getresponse()
                data = response.read()
                fault = False
                if self.command == "GET" and proxy.match in self.path and len(data) > 1:
                    with proxy.lock:
                        fault = proxy.cut < proxy.cuts
                        proxy.cut += fault
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                length = response.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
                self.send_header("Content-Length", length or "0")
                self.end_headers()
                if fault:
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                elif self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class RefusingProxy(FaultProxy):
    """A FaultProxy (cutting nothing) that answers 503 SlowDown, as a throttling S3 does, to every request of a
    method in ``refuse`` whose path contains ``match``; ``refused`` counts them. Everything else passes through."""

    def __init__(self, upstream: str, match: str = "", refuse: tuple[str, ...] = ("PUT",)):
        super().__init__(upstream, match="\0", cuts=0)
        self.refused = 0
        proxy, forwarding = self, self.server.RequestHandlerClass
        body = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"

        class Refusing(forwarding):
            def _forward(self):
                if self.command not in refuse or match not in self.path:
                    return super()._forward()
                self._body()
                with proxy.lock:
                    proxy.refused += 1
                self.send_response(503)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        self.server.RequestHandlerClass = Refusing
