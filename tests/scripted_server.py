"""A small real HTTP server of ours whose answers a test scripts in advance (status, headers,
body, or ``DROP``: close the connection without answering), recording every request it
receives. Runs in a thread on a free loopback port. Holds no tests itself."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

DROP = "drop"  # an answer that is no answer: the connection closes after the request


@dataclass
class Answer:
    status: int = 200
    body: dict | None = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class ScriptedServer:
    def __init__(self, answers: list[Answer | str], default: Answer | None = None) -> None:
        self.answers = list(answers)
        self.default = default
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _serve(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                with server._lock:
                    server.seen.append(Seen(self.command, self.path,
                                            {k.lower(): v for k, v in self.headers.items()},
                                            body))
                    answer = server.answers.pop(0) if server.answers else server.default
                if answer is None or answer == DROP:
                    self.close_connection = True
                    return
                payload = json.dumps(answer.body or {}).encode()
                self.send_response(answer.status)
                for name, value in answer.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = _serve

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> ScriptedServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


def error(status: int, code: str, retry_after: str | None = None, **details) -> Answer:
    headers = {"Retry-After": retry_after} if retry_after is not None else {}
    headers["X-Request-Id"] = f"req-{status}-{code}"
    return Answer(status, {"error": {"code": code, "message": code.lower(),
                                     "details": details, "retryable": status >= 429,
                                     "retryAfter": None}}, headers)
