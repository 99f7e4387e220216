"""A real deployment on loopback: Redis, two apps (each uvicorn with two
worker processes) and two wsrelay sidecars in front of them."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
TESTS = Path(__file__).resolve().parent
TOKEN = "test-api-token"
SECRET = "test-hook-secret"
PATH = "/ws/socket.io/"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(url: str, what: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not come up:\n{log.read_text()[-3000:]}")


@dataclass
class Node:
    url: str
    admin: str
    app: str


class Deployment:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[subprocess.Popen[bytes]] = []
        self.nodes: list[Node] = []

    def spawn(
        self, name: str, argv: list[str], env: dict[str, str] | None = None
    ) -> tuple[subprocess.Popen[bytes], Path]:
        log = self.workdir / f"{name}.log"
        out = log.open("wb")
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        self.procs.append(proc)
        return proc, log

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()

    def logs(self) -> str:
        return "\n".join(f"== {f.name}\n{f.read_text()[-2000:]}" for f in sorted(self.workdir.glob("*.log")))


def binary() -> str:
    path = Path(os.environ.get("WSRELAY_BIN", ROOT / "target" / "debug" / "wsrelay"))
    if not path.is_absolute():
        path = ROOT / path
    if not path.exists():
        pytest.exit(f"no wsrelay binary at {path}: build it (cargo build) or set WSRELAY_BIN", 2)
    return str(path)


@pytest.fixture(scope="session")
def deployment() -> Iterator[Deployment]:
    redis = shutil.which("redis-server")
    if redis is None:
        pytest.exit("redis-server is not on PATH (make test installs it)", 2)
    workdir = Path(tempfile.mkdtemp(prefix="wsrelay-py-"))
    d = Deployment(workdir)
    try:
        rport = free_port()
        proc, log = d.spawn(
            "redis", [redis, "--port", str(rport), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", rport), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(log.read_text()) from None
                time.sleep(0.05)
        # a and b: the ASGI app (uvicorn, two workers each); c: the WSGI app.
        for name in ("a", "b", "c"):
            app_port, port, admin = free_port(), free_port(), free_port()
            env = {
                "WSRELAY_ADMIN_URL": f"http://127.0.0.1:{admin}",
                "WSRELAY_API_TOKEN": TOKEN,
                "WSRELAY_HOOK_SECRET": SECRET,
                "PYTHONPATH": str(TESTS),
                # Replica a's app sets always_connect=True (as Open WebUI does), b's does not.
                "ALWAYS_CONNECT": "1" if name == "a" else "0",
            }
            if name == "c":
                app_argv = [sys.executable, str(TESTS / "wsgi_app.py"), str(app_port)]
            else:
                app_argv = [
                    sys.executable,
                    "-m",
                    "uvicorn",
                    "app:app",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(app_port),
                    "--workers",
                    "2",
                    "--log-level",
                    "warning",
                ]
            app, app_log = d.spawn(f"app-{name}", app_argv, env)
            hooks = []
            for hook in ("connect", "message", "disconnect"):
                hooks += [f"--{hook}-hook", f"{PATH}hooks/{hook}"]
            side_argv = [
                binary(),
                "--listen",
                f"127.0.0.1:{port}",
                "--admin-listen",
                f"127.0.0.1:{admin}",
                "--upstream",
                f"http://127.0.0.1:{app_port}",
                "--redis-url",
                f"redis://127.0.0.1:{rport}/0",
                "--node-id",
                name,
                "--socketio-path",
                PATH,
                "--api-token",
                TOKEN,
                "--hook-secret",
                SECRET,
                "--ws-enabled",
                "false",
                "--log-level",
                "warn",
                *hooks,
            ]
            side, side_log = d.spawn(f"wsrelay-{name}", side_argv)
            wait_for(f"http://127.0.0.1:{app_port}/", f"app {name}", app, app_log)
            wait_for(f"http://127.0.0.1:{admin}/readyz?broker", f"wsrelay {name}", side, side_log)
            d.nodes.append(
                Node(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin}", f"http://127.0.0.1:{app_port}")
            )
        yield d
    except BaseException:
        print(d.logs(), file=sys.stderr)
        raise
    finally:
        d.stop()
        shutil.rmtree(workdir, ignore_errors=True)
