"""A threading HTTP server for stub servers in tests: a request that fails in its handler (typically a client that
hung up mid-answer, when the code under test gave up at its timeout) is kept in `errors`, not printed. socketserver
prints such tracebacks to stderr from the handler's thread, possibly after the test that made them has ended, into
the stderr another test is reading."""

from __future__ import annotations

import sys
from http.server import ThreadingHTTPServer


class QuietHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.errors: list[str] = []

    def handle_error(self, request, client_address):
        self.errors.append(repr(sys.exc_info()[1]))
