"""Every setting core/foundation/config.py reads is listed in .env.example and documented in README.md or docs/."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONFIG = (ROOT / "core" / "foundation" / "config.py").read_text()
SETTINGS = sorted(set(re.findall(r'"([A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+)"', CONFIG)))
ENV_EXAMPLE = (ROOT / ".env.example").read_text()
DOCS = "\n".join(p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])


def test_the_settings_are_found() -> None:
    assert {"MQTT_BROKER", "MAX_INFLIGHT", "WORKER_COUNT", "REDIS_URL", "DATABASE_URL"} <= set(SETTINGS)


@pytest.mark.parametrize("name", SETTINGS)
def test_setting_is_in_env_example(name: str) -> None:
    # `NAME=value`, or commented out (`# NAME=...`) where the default is "unset".
    assert re.search(rf"^(# )?{name}=", ENV_EXAMPLE, re.MULTILINE), f"{name} is missing from .env.example"


@pytest.mark.parametrize("name", SETTINGS)
def test_setting_is_documented(name: str) -> None:
    assert re.search(rf"\b{name}\b", DOCS), f"{name} is not documented in README.md or docs/"
