"""Starts and stops the `server` example binary for the client checks and the load test.

Standard library only. The server is started on a free loopback port, its standard error goes
to a temporary file (shown when something fails), and readiness is a poll of GET /health
against a deadline, never a fixed sleep.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request

DEFAULT_BINARY = "target/release/examples/server"
DEFAULT_MODEL = "fixtures/pipeline/sd1"


def free_port() -> int:
    """A port that was free a moment ago (the server may still lose a race for it; `start`
    then retries on another)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def get_json(port: int, path: str, api_key: str | None = None, timeout: float = 5.0):
    """GET http://127.0.0.1:PORT/PATH and parse the JSON answer; (status, body)."""
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", headers=auth_headers(api_key)
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw)
        except ValueError:
            return e.code, raw.decode("utf-8", "replace")


class Server:
    """The server binary running on the tiny model. Use as a context manager, or call
    `start()` and `stop()`."""

    def __init__(
        self,
        binary: str = DEFAULT_BINARY,
        model: str = DEFAULT_MODEL,
        extra_args: list[str] | None = None,
        api_key: str | None = None,
        ready_timeout: float = 30.0,
    ):
        self.binary = binary
        self.model = model
        self.extra_args = list(extra_args or [])
        self.api_key = api_key
        self.ready_timeout = ready_timeout
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self._log = tempfile.NamedTemporaryFile(
            prefix="sd-server-", suffix=".log", delete=False
        )
        self.log_path = self._log.name

    # -- lifetime ---------------------------------------------------------------------------

    def start(self) -> "Server":
        if not os.access(self.binary, os.X_OK):
            raise RuntimeError(
                f"{self.binary} is not an executable: build it first with "
                "`cargo build --release --example server`"
            )
        last_error = None
        for _attempt in range(3):
            self.port = free_port()
            cmd = [self.binary, "-m", self.model, "--port", str(self.port)]
            if self.api_key:
                cmd += ["--api-key", self.api_key]
            cmd += self.extra_args
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log
            )
            try:
                self._wait_ready()
                return self
            except RuntimeError as e:  # it exited (a lost port race, say): try another port
                last_error = e
                if self.proc.poll() is None:
                    self.proc.kill()
                    self.proc.wait()
        raise RuntimeError(f"the server did not start: {last_error}\n{self.log_tail()}")

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        delay = 0.02
        while True:
            code = self.proc.poll()
            if code is not None:
                raise RuntimeError(f"the server exited with status {code} before it was ready")
            try:
                status, body = get_json(self.port, "/health", self.api_key, timeout=2.0)
                if status == 200 and isinstance(body, dict) and body.get("status") == "ok":
                    return
            except (OSError, ValueError):
                pass  # not listening yet
            if time.monotonic() > deadline:
                self.proc.kill()
                self.proc.wait()
                raise RuntimeError(
                    f"GET /health did not answer ok within {self.ready_timeout:.0f} s"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.2)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then wait up to `timeout` seconds: the exit status, or None if it had to
        be killed."""
        if self.proc is None:
            return None
        if self.proc.poll() is not None:
            return self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None

    def close(self) -> None:
        """Kills the process if it still runs and removes the log."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()
        try:
            os.unlink(self.log_path)
        except OSError:
            pass

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- helpers ----------------------------------------------------------------------------

    @property
    def pid(self) -> int:
        return self.proc.pid

    def health(self) -> dict:
        status, body = get_json(self.port, "/health", self.api_key)
        if status != 200:
            raise RuntimeError(f"GET /health answered {status}: {body}")
        return body

    def rss_kib(self) -> int | None:
        """VmRSS of the server process in KiB, from /proc (None once it has exited)."""
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1])
        except OSError:
            return None
        return None

    def log_tail(self, lines: int = 20) -> str:
        self._log.flush()
        try:
            with open(self.log_path, errors="replace") as f:
                tail = f.readlines()[-lines:]
        except OSError:
            return ""
        return "server log (last lines):\n" + "".join("  " + t for t in tail)


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk; ValueError if it is not a PNG."""
    if len(data) < 24 or data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        raise ValueError("not a PNG")
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def b64_png_size(text: str) -> tuple[int, int]:
    return png_size(base64.b64decode(text, validate=True))
