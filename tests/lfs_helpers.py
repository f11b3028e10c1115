"""A git-lfs server on the loopback interface, for the publish tests and benchmarks/bench_publish.py.

The server is giftless 0.6.2 (its own venv: scripts/lfs_server.sh) served by waitress on 127.0.0.1,
anonymous read/write, with local storage under a root directory. A small WSGI middleware in front of
giftless logs every request (method, path, body bytes, status) and can hold uploads after N objects,
so that a test can kill a publish in the middle of its LFS push.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GIFTLESS = os.environ.get("QUANTMILL_GIFTLESS_PYTHON") or str(
    Path.home() / ".cache" / "quantmill" / "giftless-venv" / "bin" / "python")

PROBE = '''
"""WSGI middleware in front of giftless: a JSON line per request; holds PUTs once `stall_after` are in."""
import json, os, threading, time

class Probe:
    def __init__(self, app, log, control):
        self.app, self.log, self.control = app, log, control
        self.lock, self.puts = threading.Lock(), 0

    def _write(self, **record):
        with self.lock, open(self.log, "a") as fh:
            fh.write(json.dumps(record) + "\\n")

    def __call__(self, environ, start_response):
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
        size = int(environ.get("CONTENT_LENGTH") or 0)
        limit = os.path.join(self.control, "stall_after")
        if method == "PUT":
            with self.lock:
                stall = os.path.exists(limit) and self.puts >= int(open(limit).read())
                self.puts += 0 if stall else 1
            if stall:
                self._write(method=method, path=path, bytes=size, status=503, stalled=True)
                open(os.path.join(self.control, "stalled"), "w").close()
                deadline = time.monotonic() + 120
                while os.path.exists(limit) and time.monotonic() < deadline:
                    time.sleep(0.05)
                start_response("503 Service Unavailable", [("Content-Type", "text/plain")])
                return [b"held by the test\\n"]
        seen = []

        def record_status(status, headers, exc_info=None):
            seen.append(int(status.split()[0]))
            return start_response(status, headers, exc_info)

        result = self.app(environ, record_status)
        self._write(method=method, path=path, bytes=size, status=seen[0] if seen else None)
        return result
'''


def lfs_missing() -> str | None:
    """Why the server cannot run here ("needs git-lfs ..."), or None when git-lfs and the giftless venv are present."""
    missing = []
    if shutil.which("git-lfs") is None:
        missing.append("git-lfs (apt-get install git-lfs)")
    if not Path(GIFTLESS).is_file():
        missing.append(f"the giftless venv's python {GIFTLESS} (bash scripts/lfs_server.sh)")
    return "needs " + " and ".join(missing) if missing else None


@dataclass
class LfsServer:
    port: int
    storage: Path
    log: Path
    control: Path

    def url(self, org: str, repo: str) -> str:
        return f"http://127.0.0.1:{self.port}/{org}/{repo}"

    def requests(self) -> list[dict[str, Any]]:
        if not self.log.is_file():
            return []
        return [json.loads(line) for line in self.log.read_text(encoding="utf-8").splitlines()]

    def objects(self, org: str, repo: str) -> dict[str, Path]:
        directory = self.storage / org / repo
        return {p.name: p for p in directory.iterdir() if p.is_file()} if directory.is_dir() else {}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def giftless(root: Path) -> Iterator[LfsServer]:
    """giftless on 127.0.0.1 (waitress) with its files under ``root``; always stopped at the end.

    Raises RuntimeError, with the tail of the server's log, when it exits or does not listen within 60 s.
    """
    (root / "control").mkdir(parents=True)
    (root / "probe_mw.py").write_text(PROBE, encoding="utf-8")
    server = LfsServer(_free_port(), root / "storage", root / "requests.jsonl", root / "control")
    config = {
        # read_write: anonymous users may upload (the default, read_only, refuses every push)
        "AUTH_PROVIDERS": ["giftless.auth.allow_anon:read_write"],
        # the upload/verify actions carry a JWT signed with this key (the default key is 9 bytes)
        "PRE_AUTHORIZED_ACTION_PROVIDER": {"factory": "giftless.auth.jwt:factory",
                                           "options": {"algorithm": "HS256", "private_key": secrets.token_hex(32),
                                                       "default_lifetime": 300}},
        # basic_streaming: uploads and downloads go through giftless itself (URLs built from the request's
        # host, i.e. 127.0.0.1:PORT), into local storage at <path>/<org>/<repo>/<oid>
        "TRANSFER_ADAPTERS": {"basic": {"factory": "giftless.transfer.basic_streaming:factory",
                                        "options": {"storage_class": "giftless.storage.local_storage:LocalStorage",
                                                    "storage_options": {"path": str(server.storage)},
                                                    "action_lifetime": 900}}},
        "MIDDLEWARE": [{"class": "probe_mw:Probe",
                        "kwargs": {"log": str(server.log), "control": str(server.control)}}],
    }
    (root / "giftless.yaml").write_text(json.dumps(config), encoding="utf-8")  # JSON is YAML
    env = {**os.environ, "GIFTLESS_CONFIG_FILE": str(root / "giftless.yaml"), "PYTHONPATH": str(root)}
    with open(root / "server.log", "wb") as out:
        proc = subprocess.Popen([GIFTLESS, "-m", "waitress", f"--listen=127.0.0.1:{server.port}", "--threads=16",
                                 "giftless.wsgi_entrypoint:app"], cwd=root, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"giftless exited {proc.returncode}:\n{(root / 'server.log').read_text()[-3000:]}")
            try:
                socket.create_connection(("127.0.0.1", server.port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"giftless did not listen within 60 s:\n{(root / 'server.log').read_text()[-3000:]}") from None
                time.sleep(0.1)
        yield server
    finally:
        (server.control / "stall_after").unlink(missing_ok=True)
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
