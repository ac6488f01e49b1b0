"""Run `python main.py ...` as a child process with a controlled environment, for CLI and fault tests.

The environment is built from scratch (no MQTT_* leaking in from the caller) and `.env` is not
read, so each test states every setting it relies on. Output (stdout and stderr) goes to a file
that tests poll; the process is signalled by its PID only.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from tests.support.rt_wait import wait_until

ROOT = Path(__file__).resolve().parents[2]
NO_ENV_FILE = "/nonexistent/.env"


def base_env(**extra: str) -> dict[str, str]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/tmp"),
        "LANG": "C.UTF-8",
        "PYTHONUNBUFFERED": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        # Apps of many tests share the session broker: none may adopt another test's sessions.
        "MQTT_ORPHAN_GRACE": "0",
    }
    env.update(extra)
    return env


def run_main(*args: str, env: dict[str, str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run main.py to completion; returns the completed process with text output."""
    return subprocess.run(
        [sys.executable, "main.py", *args, "--env-file", NO_ENV_FILE], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
    )


class AppProcess:
    """`python main.py [args]` in the background."""

    def __init__(self, env: dict[str, str], *args: str, name: str = "app") -> None:
        self.env = env
        self.args = args
        fd, path = tempfile.mkstemp(prefix=f"{name}-", suffix=".out")
        os.close(fd)
        self.output_path = Path(path)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> "AppProcess":
        with self.output_path.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "main.py", *self.args, "--env-file", NO_ENV_FILE], cwd=ROOT, env=self.env,
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        return self

    def output(self) -> str:
        return self.output_path.read_text(errors="replace")

    async def wait_output(self, text: str, timeout: float = 30, count: int = 1) -> None:
        def seen() -> bool:
            if self.proc is not None and self.proc.poll() is not None and self.output().count(text) < count:
                raise AssertionError(f"process exited ({self.proc.returncode}) before printing {text!r}:\n{self.output()}")
            return self.output().count(text) >= count

        await wait_until(seen, f"{text!r} in the output of {self.args or 'main.py'}", timeout)

    async def wait_ready(self, timeout: float = 30) -> None:
        """Until the runtime logged its subscriptions (counting from this process's own output)."""
        await self.wait_output("subscribed to", timeout)

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signum)

    async def wait_exit(self, timeout: float = 30) -> int:
        assert self.proc is not None
        await wait_until(lambda: self.proc.poll() is not None, "the app to exit", timeout)  # type: ignore[union-attr]
        return self.proc.returncode

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.output_path.unlink(missing_ok=True)


def read_events(log: Path) -> list[dict[str, Any]]:
    """The JSON lines written by tests/apps/core_app."""
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
