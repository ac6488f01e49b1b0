"""PROFILE presets groups of settings; explicit settings win; `routes` and the status page show it."""

from __future__ import annotations

import pytest

from core.foundation.config import ConfigError, Settings, load_settings
from core.foundation.profiles import PROFILES, describe_profile


def test_no_profile_keeps_the_defaults() -> None:
    settings = load_settings({})
    assert settings.profile is None
    assert settings == Settings(mqtt_client_id=settings.mqtt_client_id)


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_each_profile_sets_its_documented_values(name: str) -> None:
    settings = load_settings({"PROFILE": name})
    assert settings.profile == name
    # Every preset value is one load_settings accepts, and lands in the setting of that name.
    for variable, value in PROFILES[name].values.items():
        alone = load_settings({variable: value})
        assert getattr(settings, variable.lower()) == getattr(alone, variable.lower()), variable


def test_profiles_cover_inflight_batches_logging_heartbeat_and_timeouts() -> None:
    for profile in PROFILES.values():
        assert {"MAX_INFLIGHT", "STREAM_BATCH_SIZE", "OUTBOX_BATCH_SIZE", "LOG_LEVEL", "LOG_FORMAT",
                "WORKER_HEARTBEAT_TIMEOUT", "SHUTDOWN_TIMEOUT", "WORKER_HANDLER_TIMEOUT"} <= set(profile.values)


def test_presets_differ_where_they_should() -> None:
    batch, fast, debug, production = (load_settings({"PROFILE": n}) for n in ("batch", "fast", "debug", "production"))
    assert batch.max_inflight > production.max_inflight > fast.max_inflight
    assert batch.outbox_batch_size > fast.outbox_batch_size
    assert (debug.log_level, debug.log_format) == ("DEBUG", "text")
    assert (production.log_level, production.log_format) == ("INFO", "json")
    assert debug.worker_handler_timeout == 0  # a handler paused in a debugger is not "stuck"


def test_explicit_settings_win_over_the_profile() -> None:
    settings = load_settings({"PROFILE": "batch", "MAX_INFLIGHT": "7", "LOG_FORMAT": "text", "OUTBOX_BATCH_SIZE": " "})
    assert settings.max_inflight == 7
    assert settings.log_format == "text"
    assert settings.outbox_batch_size == int(PROFILES["batch"].values["OUTBOX_BATCH_SIZE"])  # blank is unset
    assert settings.profile_explicit == ("LOG_FORMAT", "MAX_INFLIGHT")


def test_profile_name_is_case_insensitive_and_an_unknown_one_names_the_variable() -> None:
    assert load_settings({"PROFILE": " Fast "}).profile == "fast"
    with pytest.raises(ConfigError, match=r"PROFILE='turbo'.*production"):
        load_settings({"PROFILE": "turbo"})


def test_describe_profile_names_it_and_the_explicit_settings() -> None:
    assert describe_profile(load_settings({})) == "profile: none (PROFILE unset: the defaults)"
    text = describe_profile(load_settings({"PROFILE": "fast", "MAX_INFLIGHT": "9"}))
    assert text.startswith("profile: fast")
    assert "MAX_INFLIGHT=9 (explicit)" in text
    assert f"STREAM_BATCH_SIZE={PROFILES['fast'].values['STREAM_BATCH_SIZE']}" in text


def test_status_data_carries_the_profile() -> None:
    from core.operations.metrics import SystemSample, SystemView
    from core.operations.status_page import render_fragment, status_data

    view = SystemView(SystemSample("single", 1, 1.0, False, None, []), [], [], {}, [], {})
    readiness = {"ready": True, "reasons": [], "checks": {}}
    data = status_data(view, readiness, load_settings({"PROFILE": "batch", "MAX_INFLIGHT": "9"}))
    assert data["profile"] == {"name": "batch", "explicit": ["MAX_INFLIGHT"]}
    assert 'id="profile"' in render_fragment(data) and "batch" in render_fragment(data)
    assert status_data(view, readiness, load_settings({}))["profile"] == {"name": None, "explicit": []}


def test_readme_table_matches_the_presets() -> None:
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("### Profiles", 1)[1].split("\n## ", 1)[0]
    rows = [line.strip("|").split("|") for line in section.splitlines() if line.startswith("| `")]
    table = {cells[0].strip(" `"): [c.strip() for c in cells[1:]] for cells in rows}
    names = list(PROFILES)
    assert section.count("| setting | " + " | ".join(f"`{n}`" for n in names) + " |") == 1
    expected = {key for p in PROFILES.values() for key in p.values}
    assert set(table) == expected
    for key, values in table.items():
        assert values == [PROFILES[n].values.get(key, "—") for n in names], key
