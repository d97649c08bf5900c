"""A real HTTP server on 127.0.0.1 for tests of HTTP clients (retriever, teacher), one per test.

`respond(path, headers, body)` gets each POST's path, lower-cased headers and parsed JSON body and returns
(status, payload, delay_s): payload is sent as JSON unless it is a str (sent as is), after sleeping
delay_s. The server is threaded, so a slow reply does not hold up the next request.
"""
import http.server
import json
import threading
import time
from typing import Any, Callable

Respond = Callable[[str, dict[str, str], Any], tuple[int, Any, float]]


class LocalJSONServer:
    def __init__(self, respond: Respond):
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                status, payload, delay_s = respond(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                time.sleep(delay_s)
                data = (payload if isinstance(payload, str) else json.dumps(payload)).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up waiting (the slow-reply cases)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True  # shutdown does not wait for a handler still sleeping
        self.address = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
