"""Configuration: YAML file, environment overrides, errors that name the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from node.config import ConfigError, load_settings

EXAMPLE = Path(__file__).resolve().parents[1] / "deploy" / "pacsnode.example.yaml"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("PACSNODE"):
            monkeypatch.delenv(key)


def test_defaults_are_the_embedded_setup() -> None:
    settings = load_settings()
    assert settings.node.ae_title == "PACSNODE"
    assert (settings.node.host, settings.node.port) == ("0.0.0.0", 11112)
    assert settings.storage.data_dir == Path("var")
    assert settings.database_url == "sqlite:///var/pacsnode.db"
    assert settings.study.stable_age_s == 10
    assert settings.destinations == []
    assert (settings.web.host, settings.web.port) == ("127.0.0.1", 8080)


def test_example_file_is_valid_and_matches_defaults() -> None:
    settings = load_settings(EXAMPLE)
    assert settings.node.ae_title == "PACSNODE"
    assert settings.node.port == 11112
    assert settings.database.url == "sqlite:///./var/pacsnode.db"


def test_yaml_then_environment_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "node: {ae_title: EDGE1, port: 104}\n"
        "destinations:\n  - {name: pacs, ae_title: ORTHANC, host: pacs.local, port: 4242}\n"
    )
    monkeypatch.setenv("PACSNODE__NODE__PORT", "11113")
    monkeypatch.setenv("PACSNODE__STUDY__STABLE_AGE_S", "2.5")
    settings = load_settings(path)
    assert settings.node.ae_title == "EDGE1"  # from the file
    assert settings.node.port == 11113  # the environment wins
    assert settings.study.stable_age_s == 2.5
    assert settings.destination("pacs").port == 4242


def test_config_file_from_environment_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("node: {ae_title: FROMENV}\n")
    monkeypatch.setenv("PACSNODE_CONFIG", str(path))
    assert load_settings().node.ae_title == "FROMENV"


@pytest.mark.parametrize(
    ("yaml_text", "env", "named"),
    [
        ("node: {port: 70000}\n", {}, "node.port"),
        ("node: {ae_title: 'WAY_TOO_LONG_AE_TITLE'}\n", {}, "node.ae_title"),
        ("study: {stable_age: 5}\n", {}, "study.stable_age"),
        ("destinations: [{name: x, host: h, port: 1}]\n", {}, "destinations.0.ae_title"),
        ("", {"PACSNODE__NODE__PORT": "abc"}, "node.port"),
        ("", {"PACSNODE__NODES__PORT": "1"}, "nodes"),
        ("node: {association_timeout_s: 0}\n", {}, "node.association_timeout_s"),
        ("node: {max_associations_per_host: 0}\n", {}, "node.max_associations_per_host"),
        ("", {"PACSNODE__NODE__MAX_INSTANCE_MB": "-1"}, "node.max_instance_mb"),
        ("delivery: {breaker_failures: 0}\n", {}, "delivery.breaker_failures"),
        ("delivery: {retry_jitter: 1.5}\n", {}, "delivery.retry_jitter"),
        ("delivery: {retry_initial_s: 30, retry_max_s: 10}\n", {},
         "delivery: retry_max_s (10) must be at least retry_initial_s (30)"),
    ],
)
def test_bad_values_name_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, yaml_text: str, env: dict[str, str], named: str
) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert named in str(info.value)


def test_a_removed_key_names_its_replacement(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("delivery: {max_attempts: 50}\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert "delivery: max_attempts was removed" in str(info.value)
    assert "set delivery.max_age_h instead" in str(info.value)


def test_missing_and_broken_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("node: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(broken)


def test_cli_reports_config_error_without_traceback(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("node: {port: -1}\n")
    result = subprocess.run(
        [sys.executable, "-m", "node.cli", "--config", str(path), "studies"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "node.port" in result.stderr
    assert "Traceback" not in result.stderr
