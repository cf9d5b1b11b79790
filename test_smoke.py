"""Smoke and correctness tests for gpt.py, seq2seq.py and vit.py: python -m pytest -q

Each test builds the smallest model or dataset that shows one property, and asserts it.
The scripts are imported as modules (importing one trains nothing).
"""

import http.server
import os
import subprocess
import sys
import threading

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def run_script(*args, timeout=120):
    """Run a script as a user would; return (exit code, stdout, stderr)."""
    result = subprocess.run([sys.executable, *args], cwd=HERE, capture_output=True, text=True, timeout=timeout)
    return result.returncode, result.stdout, result.stderr


def assert_one_line_error(code, stderr, *words):
    """A user mistake ends with a non-zero exit and one line on stderr naming the problem, no traceback."""
    assert code != 0
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    for word in words:
        assert word in lines[0], lines[0]


@pytest.fixture
def http_server():
    """Serve files from memory on 127.0.0.1: http_server({"/a.gz": b"..."}) returns the base URL.
    A path listed in `truncated` announces its full length but sends only half, then hangs up."""
    servers = []

    def start(files, truncated=()):
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                body = files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2] if self.path in truncated else body)

            def log_message(self, *args):
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()
