"""Private Mosquitto and Redis servers for tests and benchmarks.

Each server runs as a child process on 127.0.0.1 and a free port, with its
configuration, log and persistence files in its own temporary directory. It is
stopped by PID only, so the shared servers on this machine are never touched.
"""

from __future__ import annotations

import atexit
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Mapping

# Daemons often live in sbin directories that a user's PATH leaves out.
_SBIN_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")


def find_server_binary(name: str, variable: str, env: Mapping[str, str] = os.environ) -> str:
    """`variable`'s value if set, else `name` on PATH (then the sbin directories); `name` if not found."""
    explicit = env.get(variable, "").strip()
    if explicit:
        return explicit
    search = os.pathsep.join([env.get("PATH", os.defpath), *_SBIN_DIRS])
    return shutil.which(name, path=search) or name


def require_server_binary(binary: str, name: str, variable: str, env: Mapping[str, str] = os.environ) -> None:
    """Skip the test when `binary` is not executable; under CI=true fail it instead, so a runner without
    the server does not pass by skipping half the suite."""
    if os.path.isabs(binary) and os.access(binary, os.X_OK):
        return
    import pytest  # late: benchmarks use this module without pytest
    message = f"{name} not found ({binary!r}); install it or set {variable} to its path"
    if env.get("CI", "").strip().lower() in ("1", "true", "yes"):
        pytest.fail(f"{message} (CI is set: a missing server fails the run)", pytrace=False)
    pytest.skip(message)


MOSQUITTO_BIN = find_server_binary("mosquitto", "MOSQUITTO_BIN")
REDIS_BIN = find_server_binary("redis-server", "REDIS_SERVER_BIN")
HOST = "127.0.0.1"

# Servers still running when the interpreter exits are killed, so a crashed
# test session does not leave brokers behind.
_live: "set[_ServerProcess]" = set()


@atexit.register
def _kill_leftovers() -> None:
    for server in list(_live):
        server.kill()


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _port_accepts(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


class ServerStartError(RuntimeError):
    """A private server did not come up; the message carries its log."""


class _ServerProcess:
    """Common lifecycle of a server child process: start, stop, kill, restart."""

    name = "server"

    def __init__(self, port: int | None, tmpdir: str | None) -> None:
        self.host = HOST
        self._port_fixed = port is not None
        self.port = port if port is not None else free_port()
        self._own_tmpdir = tmpdir is None
        self.tmpdir = tmpdir if tmpdir is not None else tempfile.mkdtemp(prefix=f"{self.name}-")
        Path(self.tmpdir).mkdir(parents=True, exist_ok=True)
        self._proc: subprocess.Popen[bytes] | None = None
        self._starts = 0

    # -- hooks for subclasses -------------------------------------------
    def _command(self) -> list[str]:
        raise NotImplementedError

    def _is_ready(self) -> bool:
        return _port_accepts(self.port)

    @property
    def log_path(self) -> Path:
        return Path(self.tmpdir) / f"{self.name}.log"

    @property
    def _stderr_path(self) -> Path:
        return Path(self.tmpdir) / f"{self.name}.stderr"

    # -- public API -----------------------------------------------------
    @property
    def pid(self) -> int | None:
        """PID of the running server process, or None when it is not running."""
        if self._proc is None or self._proc.poll() is not None:
            return None
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self.pid is not None

    def start(self, timeout: float = 10) -> None:
        """Start the server and wait until it accepts connections.

        If the port was chosen automatically and turns out to be taken, a new
        free port is tried (only on the first start: a restart keeps its port).
        """
        if self.running:
            return
        attempts = 3 if (not self._port_fixed and self._starts == 0) else 1
        for attempt in range(attempts):
            try:
                self._start_once(timeout)
                self._starts += 1
                return
            except ServerStartError:
                if attempt == attempts - 1:
                    raise
                self.port = free_port()

    def _start_once(self, timeout: float) -> None:
        if _port_accepts(self.port):
            raise ServerStartError(f"{self.name}: port {self.port} is already in use")
        with open(self._stderr_path, "ab") as err:
            self._proc = subprocess.Popen(
                self._command(),
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                cwd=self.tmpdir,
            )
        _live.add(self)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._proc = None
                raise ServerStartError(
                    f"{self.name} on port {self.port} exited with code {code}:\n{self.log_text()}"
                )
            if self._is_ready():
                return
            time.sleep(0.02)
        self.kill()
        raise ServerStartError(
            f"{self.name} on port {self.port} not ready after {timeout}s:\n{self.log_text()}"
        )

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM the server by PID, wait, and SIGKILL it if it does not exit."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=timeout)
        self._proc = None
        _live.discard(self)
        self._wait_port_closed(timeout)

    def kill(self) -> None:
        """SIGKILL the server by PID (no clean shutdown, nothing saved)."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            try:
                os.kill(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=10)
        self._proc = None
        _live.discard(self)

    def restart(self, timeout: float = 10) -> None:
        """Stop the server cleanly and start it again on the same port."""
        self.stop()
        self.start(timeout=timeout)

    def _wait_port_closed(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while _port_accepts(self.port) and time.monotonic() < deadline:
            time.sleep(0.02)

    def log_text(self) -> str:
        """The server's log file followed by anything it wrote to stdout/stderr."""
        parts = []
        for path in (self.log_path, self._stderr_path):
            try:
                parts.append(path.read_text(errors="replace"))
            except FileNotFoundError:
                pass
        return "".join(parts)

    def cleanup(self) -> None:
        """Kill the server and remove its temporary directory if we made it."""
        self.kill()
        if self._own_tmpdir:
            shutil.rmtree(self.tmpdir, ignore_errors=True)

    def __enter__(self) -> "_ServerProcess":
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.host}:{self.port} pid={self.pid}>"


class MosquittoServer(_ServerProcess):
    """A private mosquitto broker on 127.0.0.1.

    Per-client limits are mosquitto's defaults (max_queued_messages 1000,
    max_inflight_messages 20) unless ``max_queued``/``max_inflight`` say
    otherwise; 0 means unlimited, as in mosquitto.conf. With ``persistence``
    the broker saves sessions and queued messages to a file in ``tmpdir`` on
    a clean stop, so they survive :meth:`restart` (not :meth:`kill`).
    """

    name = "mosquitto"

    def __init__(
        self,
        port: int | None = None,
        *,
        persistence: bool = False,
        max_inflight: int | None = None,
        max_queued: int | None = None,
        extra_conf: str = "",
        tmpdir: str | None = None,
    ) -> None:
        super().__init__(port, tmpdir)
        self.persistence = persistence
        self.max_inflight = max_inflight
        self.max_queued = max_queued
        self.extra_conf = extra_conf

    @property
    def conf_path(self) -> Path:
        return Path(self.tmpdir) / "mosquitto.conf"

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def config_text(self) -> str:
        """The mosquitto.conf this server runs with."""
        lines = [
            f"listener {self.port} {self.host}",
            "allow_anonymous true",
            f"log_dest file {self.log_path}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "log_timestamp_format %Y-%m-%dT%H:%M:%S",
        ]
        if os.geteuid() == 0:
            # As root mosquitto would drop to user "mosquitto", which cannot
            # write the log and persistence files in our private directory.
            lines.append(f"user {pwd.getpwuid(os.geteuid()).pw_name}")
        if self.persistence:
            lines += [
                "persistence true",
                f"persistence_location {self.tmpdir}/",
                "persistence_file mosquitto.db",
            ]
        else:
            lines.append("persistence false")
        if self.max_inflight is not None:
            lines.append(f"max_inflight_messages {self.max_inflight}")
        if self.max_queued is not None:
            lines.append(f"max_queued_messages {self.max_queued}")
        if self.extra_conf:
            lines.append(self.extra_conf.strip())
        return "\n".join(lines) + "\n"

    def _command(self) -> list[str]:
        self.conf_path.write_text(self.config_text())
        return [MOSQUITTO_BIN, "-c", str(self.conf_path)]

    def __enter__(self) -> "MosquittoServer":
        self.start()
        return self


class RedisServer(_ServerProcess):
    """A private redis-server on 127.0.0.1.

    Without ``appendonly`` nothing is persisted (``--save ""``), so a restart
    starts empty. With ``appendonly=True`` every write is fsynced to an AOF in
    ``tmpdir`` and survives both :meth:`restart` and :meth:`kill`.
    """

    name = "redis"

    def __init__(
        self,
        port: int | None = None,
        *,
        appendonly: bool = False,
        extra_args: list[str] | None = None,
        tmpdir: str | None = None,
    ) -> None:
        super().__init__(port, tmpdir)
        self.appendonly = appendonly
        self.extra_args = list(extra_args or [])

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def _command(self) -> list[str]:
        cmd = [
            REDIS_BIN,
            "--port", str(self.port),
            "--bind", self.host,
            "--save", "",
            "--dir", self.tmpdir,
            "--logfile", str(self.log_path),
            "--daemonize", "no",
            "--protected-mode", "no",
        ]
        if self.appendonly:
            cmd += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            cmd += ["--appendonly", "no"]
        return cmd + self.extra_args

    def _is_ready(self) -> bool:
        # A TCP connect succeeds while Redis still loads its AOF; PING answers
        # +PONG only once it serves commands.
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def __enter__(self) -> "RedisServer":
        self.start()
        return self
