"""The broker fixtures find mosquitto and redis-server on PATH; under CI a missing one fails, it does not skip."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support.servers import find_server_binary, require_server_binary


def _executable(directory: Path, name: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)
    return path


def test_binary_is_found_on_path(tmp_path: Path) -> None:
    found = _executable(tmp_path / "bin", "mosquitto")
    env = {"PATH": f"{tmp_path / 'empty'}{os.pathsep}{tmp_path / 'bin'}"}
    assert find_server_binary("mosquitto", "MOSQUITTO_BIN", env) == str(found)


def test_explicit_variable_wins_over_path(tmp_path: Path) -> None:
    _executable(tmp_path / "bin", "redis-server")
    chosen = _executable(tmp_path / "elsewhere", "redis-server")
    env = {"PATH": str(tmp_path / "bin"), "REDIS_SERVER_BIN": str(chosen)}
    assert find_server_binary("redis-server", "REDIS_SERVER_BIN", env) == str(chosen)


def test_missing_binary_skips_outside_ci(tmp_path: Path) -> None:
    env = {"PATH": str(tmp_path)}
    binary = find_server_binary("no-such-server-xyz", "NO_SUCH_BIN", env)
    with pytest.raises(pytest.skip.Exception, match="no-such-server-xyz"):
        require_server_binary(binary, "no-such-server-xyz", "NO_SUCH_BIN", env)


@pytest.mark.parametrize("ci", ["true", "1", "TRUE"])
def test_missing_binary_fails_under_ci(tmp_path: Path, ci: str) -> None:
    env = {"PATH": str(tmp_path), "CI": ci}
    binary = find_server_binary("no-such-server-xyz", "NO_SUCH_BIN", env)
    with pytest.raises(pytest.fail.Exception, match="NO_SUCH_BIN"):
        require_server_binary(binary, "no-such-server-xyz", "NO_SUCH_BIN", env)


def test_present_binary_passes_under_ci(tmp_path: Path) -> None:
    found = _executable(tmp_path, "mosquitto")
    require_server_binary(str(found), "mosquitto", "MOSQUITTO_BIN", {"CI": "true"})
