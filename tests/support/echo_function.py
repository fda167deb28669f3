"""A stand-in function server for gateway tests: some "function image" the gateway can run.

Reads FAASMOE_HOST/FAASMOE_PORT like the real function server and answers:
  GET  /ready       503 for ECHO_READY_AFTER_S seconds after start, then 200; with ECHO_READY_FAIL,
                    500 {"status": "failed", "error": ECHO_READY_FAIL} (a shard that failed to load)
  GET  /pid         this process's PID
  GET  /env/NAME    the value of environment variable NAME (404 if unset)
  HEAD (any path)   200, no body
  POST, PUT, PATCH, DELETE, OPTIONS (any path)   the request body, with the request's Content-Type
ECHO_STARTUP_DELAY_S delays listening (a slow import); ECHO_FAIL_FIRST makes the first N
POSTs answer 503 with Retry-After: 0; ECHO_WATCHDOG_500_FIRST makes the first N answer 500 as
of-watchdog does when its function server is not up yet; ECHO_EXIT_CODE makes it exit at once with
that code.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class EchoHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the gateway's pooled client expects
    started = time.monotonic()
    ready_after_s = float(os.environ.get("ECHO_READY_AFTER_S", "0.3"))
    failures_left = int(os.environ.get("ECHO_FAIL_FIRST", "0"))
    watchdog_failures_left = int(os.environ.get("ECHO_WATCHDOG_500_FIRST", "0"))
    ready_failure = os.environ.get("ECHO_READY_FAIL")
    lock = threading.Lock()

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._read_body()  # a GET may carry one too: left unread, it would be parsed as the next request
        if self.path == "/ready" and self.ready_failure is not None:
            self._reply(500, json.dumps({"status": "failed", "error": self.ready_failure}).encode())
        elif self.path == "/ready":
            ready = time.monotonic() - self.started >= self.ready_after_s
            self._reply(200 if ready else 503, b"ready" if ready else b"loading")
        elif self.path == "/pid":
            self._reply(200, str(os.getpid()).encode())
        elif self.path.startswith("/env/"):
            value = os.environ.get(self.path.removeprefix("/env/"))
            self._reply(404 if value is None else 200, (value or "unset").encode())
        else:
            self._reply(404, b"no such path")

    def do_HEAD(self) -> None:  # noqa: N802
        self._read_body()
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_POST(self) -> None:  # noqa: N802
        body = self._read_body()
        with self.lock:
            watchdog_fail = EchoHandler.watchdog_failures_left > 0
            EchoHandler.watchdog_failures_left -= watchdog_fail
            fail = not watchdog_fail and EchoHandler.failures_left > 0
            EchoHandler.failures_left -= fail
        if watchdog_fail:
            self._reply(500, b"", {"X-OpenFaaS-Internal": "of-watchdog"})
            return
        if fail:
            self._reply(503, b"busy, try again", {"Retry-After": "0"})
            return
        content_type = self.headers.get("Content-Type", "application/octet-stream")
        self._reply(200, body, {"Content-Type": content_type, "X-Echo-Pid": str(os.getpid())})

    do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_POST  # noqa: N815

    def _read_body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length", "0")))

    def _reply(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for key, value in {"Content-Type": "text/plain", **(headers or {})}.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        sys.stderr.write(f"echo {os.getpid()}: {format % args}\n")


def main() -> None:
    if "ECHO_EXIT_CODE" in os.environ:
        print("echo: exiting as asked", file=sys.stderr)
        sys.exit(int(os.environ["ECHO_EXIT_CODE"]))
    time.sleep(float(os.environ.get("ECHO_STARTUP_DELAY_S", "0")))
    server = ThreadingHTTPServer((os.environ["FAASMOE_HOST"], int(os.environ["FAASMOE_PORT"])), EchoHandler)
    EchoHandler.started = time.monotonic()
    server.serve_forever()


if __name__ == "__main__":
    main()
