"""An OIDC issuer on loopback for a service running as a separate process: discovery and a
JWKS, served from a thread (the tests that start gunicorn have no event loop to lend it)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.support.identity import AUDIENCE, Issuer, SigningKey

__all__ = ["AUDIENCE", "ThreadedIssuer", "threaded_issuer"]


@dataclass
class ThreadedIssuer:
    issuer: Issuer
    server: ThreadingHTTPServer

    @property
    def base(self) -> str:
        return self.issuer.base

    def token(self, **claims: Any) -> str:
        return self.issuer.token(**claims)


@contextmanager
def threaded_issuer() -> Iterator[ThreadedIssuer]:
    issuer = Issuer(keys=[SigningKey.rsa()])

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/.well-known/openid-configuration":
                body: dict[str, Any] = {"issuer": issuer.base, "jwks_uri": f"{issuer.base}/jwks"}
            elif self.path == "/jwks":
                body = {"keys": [key.public_jwk() for key in issuer.keys]}
            else:
                self.send_error(404)
                return
            raw = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    issuer.base = f"http://127.0.0.1:{server.server_port}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield ThreadedIssuer(issuer, server)
    finally:
        server.shutdown()
        server.server_close()
