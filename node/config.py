"""Node configuration: one YAML file, overridable key by key from the environment.

The file is given by ``--config FILE`` or the environment variable ``PACSNODE_CONFIG``.
Every key can be overridden by ``PACSNODE__SECTION__KEY`` (for example
``PACSNODE__NODE__PORT=11113``); lists such as ``destinations`` take JSON.
Validation happens once at start; a bad value raises :class:`ConfigError`, whose
message names the key (``node.port``) so an administrator knows what to fix.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

CONFIG_ENV = "PACSNODE_CONFIG"
ENV_PREFIX = "PACSNODE__"

# PS3.5 6.2: AE is at most 16 characters of the default repertoire, no backslash or
# control characters, and not only spaces.
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the offending key."""


def _check_ae_title(value: str) -> str:
    if not _AE_TITLE.match(value) or not value.strip():
        raise ValueError(
            "must be 1 to 16 printable characters, not only spaces, without backslash"
        )
    return value.strip()


class _Section(BaseModel):
    # A typo in a key must be an error that names it, never silently ignored.
    model_config = ConfigDict(extra="forbid")


class NodeConfig(_Section):
    """The DICOM listener: who we are and where we listen."""

    ae_title: str = "PACSNODE"
    host: str = "0.0.0.0"
    port: int = Field(11112, ge=1, le=65535)
    max_pdu: int = Field(
        262144, ge=0, description="Maximum PDU length we accept (0 = unlimited)."
    )
    max_associations: int = Field(32, ge=1)
    network_timeout_s: float = Field(60.0, gt=0)

    _ae = field_validator("ae_title")(_check_ae_title)


class StorageConfig(_Section):
    """Where received instances live on disk."""

    data_dir: Path = Path("./var")


class DatabaseConfig(_Section):
    """The database that indexes everything; SQLite by default, PostgreSQL by URL."""

    url: str | None = Field(
        None,
        description="SQLAlchemy URL; default: SQLite file pacsnode.db in storage.data_dir",
    )
    busy_timeout_s: float = Field(
        10.0, gt=0, description="How long a SQLite writer waits for the lock."
    )


class StudyConfig(_Section):
    """When a study counts as complete."""

    stable_age_s: float = Field(10.0, gt=0)
    check_interval_s: float = Field(1.0, gt=0)


class Destination(_Section):
    """A DICOM peer results are sent to (a PACS)."""

    name: str = Field(min_length=1)
    ae_title: str
    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)

    _ae = field_validator("ae_title")(_check_ae_title)


class WebConfig(_Section):
    """The HTTP dashboard and REST API (later issues)."""

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=1, le=65535)


class LoggingConfig(_Section):
    level: str = "INFO"

    @field_validator("level")
    @classmethod
    def _level(cls, value: str) -> str:
        upper = value.upper()
        if upper not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
        return upper


class Settings(BaseSettings):
    """The whole configuration of one node."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        case_sensitive=False,
    )

    node: NodeConfig = NodeConfig()
    storage: StorageConfig = StorageConfig()
    database: DatabaseConfig = DatabaseConfig()
    study: StudyConfig = StudyConfig()
    destinations: list[Destination] = []
    web: WebConfig = WebConfig()
    logging: LoggingConfig = LoggingConfig()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The YAML file arrives through init_settings (see load_settings); the
        # environment wins over it so one key can be changed without editing the file.
        return (env_settings, init_settings)

    @property
    def database_url(self) -> str:
        if self.database.url:
            return self.database.url
        return f"sqlite:///{(self.storage.data_dir / 'pacsnode.db').as_posix()}"

    def destination(self, name: str) -> Destination:
        for dest in self.destinations:
            if dest.name == name:
                return dest
        raise ConfigError(f"destinations: no destination named {name!r}")


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections at top level")
    return data


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        value = item.get("input")
        shown = "" if isinstance(value, (dict, list)) or value is None else f" (got {value!r})"
        lines.append(f"{key}: {item['msg']}{shown}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def _check_env_sections() -> None:
    """pydantic-settings ignores variables naming no section; a typo must not be silent."""
    sections = set(Settings.model_fields)
    for key in os.environ:
        if key.upper().startswith(ENV_PREFIX):
            section = key[len(ENV_PREFIX) :].split("__", 1)[0].lower()
            if section not in sections:
                raise ConfigError(
                    f"invalid configuration:\n  {section}: unknown section (from environment "
                    f"variable {key}); known: {', '.join(sorted(sections))}"
                )


def load_settings(path: str | Path | None = None) -> Settings:
    """Load, merge and validate the configuration.

    Parameters
    ----------
    path
        YAML file; when ``None`` the environment variable ``PACSNODE_CONFIG`` is used,
        and when that is unset too only defaults and environment overrides apply.

    Raises
    ------
    ConfigError
        With a message naming every bad key.
    """
    _check_env_sections()
    chosen = path if path is not None else os.environ.get(CONFIG_ENV) or None
    data = _read_yaml(Path(chosen)) if chosen else {}
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None
