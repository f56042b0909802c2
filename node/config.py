"""Node configuration: one YAML file, overridable key by key from the environment.

The file is given by ``--config FILE`` or the environment variable ``PACSNODE_CONFIG``.
Every key can be overridden by ``PACSNODE__SECTION__KEY`` (for example
``PACSNODE__NODE__PORT=11113``); lists such as ``destinations`` take JSON.
Validation happens once at start; a bad value raises :class:`ConfigError`, whose
message names the key (``node.port``) so an administrator knows what to fix.
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Any, Literal, Self

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from analysis.types import DEFAULT_FINAL_MASK
from node.config_web import AuditConfig, WebConfig
from node.config_workflow import DeliveryConfig, JobsConfig

CONFIG_ENV = "PACSNODE_CONFIG"
ENV_PREFIX = "PACSNODE__"

# PS3.5 6.2: AE is at most 16 characters of the default repertoire, no backslash or
# control characters, and not only spaces.
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")
# RFC 1123 host names: dot-separated labels of letters, digits and inner hyphens.
_HOST_NAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                        r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$")


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


class ListenerTLS(_Section):
    """The node's DICOM TLS listener (PS3.15 Annex B): its port, its certificate and
    key (PEM), and the CA bundle client certificates must be signed by."""

    port: int = Field(2762, ge=1, le=65535)
    certificate: Path
    private_key: Path
    ca_certificates: Path | None = None
    require_client_certificate: bool = True

    @model_validator(mode="after")
    def _ca_for_clients(self) -> Self:
        if self.require_client_certificate and self.ca_certificates is None:
            raise ValueError("ca_certificates is needed to verify client certificates "
                             "(or set require_client_certificate: false)")
        return self


class PeerTLS(_Section):
    """DICOM TLS towards a peer: the CA bundle that signed its certificate, and our
    certificate and key (PEM) for a peer that asks for one."""

    ca_certificates: Path
    certificate: Path | None = None
    private_key: Path | None = None

    @model_validator(mode="after")
    def _pair(self) -> Self:
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("certificate and private_key go together (give both or neither)")
        return self


class NodeConfig(_Section):
    """The DICOM listener: who we are and where we listen."""

    ae_title: str = "PACSNODE"
    host: str = "0.0.0.0"
    port: int = Field(11112, ge=1, le=65535)
    max_pdu: int = Field(
        262144, ge=0, description="Maximum PDU length we accept (0 = unlimited)."
    )
    max_associations: int = Field(32, ge=1)
    max_associations_per_host: int = Field(
        8, ge=1, description="Simultaneous associations from one peer IP address."
    )
    network_timeout_s: float = Field(60.0, gt=0)
    association_timeout_s: float = Field(
        30.0, gt=0, description="Time a connection has to complete association negotiation."
    )
    max_instance_mb: int = Field(
        4096, ge=1, description="Largest dataset accepted (MiB), inflated size for deflate."
    )
    tls: ListenerTLS | None = Field(
        None, description="a second listener for DICOM TLS (unset: none)"
    )
    shutdown_timeout_s: float = Field(
        20.0, gt=0, description="on SIGTERM, how long C-STOREs in flight may take to finish"
    )
    plain_listener: bool = Field(
        True, description="listen on node.port without TLS; false: DICOM TLS only"
    )

    _ae = field_validator("ae_title")(_check_ae_title)

    @model_validator(mode="after")
    def _two_ports(self) -> Self:
        if self.tls is not None and self.tls.port == self.port and self.plain_listener:
            raise ValueError("tls.port must differ from port (the plain listener)")
        if self.tls is None and not self.plain_listener:
            raise ValueError("plain_listener: false needs node.tls (there would be no listener)")
        return self


def _mode(value: Any, required: int, allowed: int) -> int:
    """A permission mode as YAML gives it (0640 is octal in YAML 1.1) or as "0640":
    at least ``required`` (the owner's bits), at most ``allowed`` (owner and group)."""
    mode = int(value, 8) if isinstance(value, str) else value
    if (not isinstance(mode, int) or isinstance(mode, bool)
            or mode & ~allowed or mode & required != required):
        raise ValueError(f"must be an octal mode from {required:04o} to {allowed:04o} "
                         f"(owner and group only), got {value!r}")
    return mode


class StorageConfig(_Section):
    """Where received instances live on disk, and who may read them.

    Patient data: files are created ``file_mode`` (owner read/write) in folders
    ``dir_mode`` (owner only); widen them for a group, never for everyone.
    """

    data_dir: Path = Path("./var")
    file_mode: int = 0o600
    dir_mode: int = 0o700

    @field_validator("file_mode", mode="before")
    @classmethod
    def _file_mode(cls, value: Any) -> int:
        return _mode(value, required=0o600, allowed=0o660)

    @field_validator("dir_mode", mode="before")
    @classmethod
    def _dir_mode(cls, value: Any) -> int:
        return _mode(value, required=0o700, allowed=0o770)


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
    tls: PeerTLS | None = Field(
        None, description="send over DICOM TLS, verifying the peer's certificate"
    )
    storage_commitment: bool = Field(
        False, description="a result counts as delivered only once the PACS confirms it "
        "(Storage Commitment Push Model; its report comes back to node.port)"
    )

    _ae = field_validator("ae_title")(_check_ae_title)


class AllowedPeer(_Section):
    """A calling AE title allowed from a host: an IP address, a CIDR network or a DNS
    name (resolved when the node starts)."""

    ae_title: str
    host: str = Field(min_length=1)

    _ae = field_validator("ae_title")(_check_ae_title)

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        value = value.strip()
        try:
            ipaddress.ip_network(value, strict=False)
        except ValueError:
            if not _HOST_NAME.match(value):
                raise ValueError(
                    "must be an IP address, a CIDR network (10.0.0.0/24) or a DNS name"
                ) from None
        return value


class SecurityConfig(_Section):
    """Who may open an association with the node.

    With no ``allowed_calling_aes`` the node accepts associations from loopback
    addresses only (secure by default); ``accept_any_calling_ae: true`` opens it to
    every host and calling AE title.
    """

    allowed_calling_aes: list[AllowedPeer] = []
    accept_any_calling_ae: bool = False

    @model_validator(mode="after")
    def _one_policy(self) -> Self:
        if self.accept_any_calling_ae and self.allowed_calling_aes:
            raise ValueError("security.accept_any_calling_ae: true ignores "
                             "security.allowed_calling_aes; set one of them")
        return self


def _as_list(value: Any) -> Any:
    """A single value where a list is expected is a list of one."""
    return [value] if isinstance(value, (str, int)) else value


class RouteMatch(_Section):
    """What a series must have for its route to apply; unset keys match anything.

    Text comparisons ignore case; each key takes one value or a list of values.
    """

    modality: list[str] | None = None
    body_part: list[str] | None = None
    sop_class: list[str] | None = Field(None, description="SOP Class UIDs")
    series_description: str | None = Field(None, description="regular expression (search)")
    calling_ae: list[str] | None = None
    min_instances: int = Field(1, ge=1)
    predicted_region: list[str] | None = Field(
        None, description="head, chest, abdomen, pelvis or other, as the region model sees the pixels"
    )

    _lists = field_validator(
        "modality", "body_part", "sop_class", "calling_ae", "predicted_region", mode="before"
    )(_as_list)

    @field_validator("predicted_region")
    @classmethod
    def _regions(cls, value: list[str] | None) -> list[str] | None:
        known = ("head", "chest", "abdomen", "pelvis", "other")
        for item in value or []:
            if item.lower() not in known:
                raise ValueError(f"{item!r} is not a region; use {', '.join(known)}")
        return [item.lower() for item in value] if value else value

    @field_validator("series_description")
    @classmethod
    def _regex(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression: {exc}") from None
        return value


class Route(_Section):
    """Which pipeline analyses a series, and where its results go."""

    name: str = Field(min_length=1, max_length=64)
    match: RouteMatch = RouteMatch()
    pipeline: str = Field(min_length=1)
    destinations: list[str] | None = Field(
        None, description="destination names; unset means every configured destination"
    )
    model: str | None = Field(
        None, description="a configured model (models[].name) for pipelines that use one; "
        "unset: the model shipped with pacsnode"
    )


DEFAULT_ROUTES = [Route(name="ct", match=RouteMatch(modality=["CT"]), pipeline="ct-body-lungs")]


class ModelConfig(_Section):
    """A segmentation model of the user's: a Keras file or SavedModel and its card.

    The card (JSON, ``pacsnode.model-card/1``) maps each output index to a segment label
    with its SNOMED CT coded category and type, and gives the preprocessing (HU window,
    input size, pixel spacing); see docs/models.md.
    """

    name: str = Field(min_length=1, max_length=64)
    path: Path
    card: Path


MaskSource = Literal["cnn", "classical"]


class SegmentationConfig(_Section):
    """How ``ct-body-lungs`` combines the CNN with the classical segmentation."""

    final_mask: dict[str, MaskSource] = Field(
        default_factory=lambda: dict(DEFAULT_FINAL_MASK),
        description="per structure, which segmenter provides the final mask",
    )
    batch_size: int = Field(16, ge=1, description="slices per CNN inference batch")

    @field_validator("final_mask")
    @classmethod
    def _structures(cls, value: dict[str, str]) -> dict[str, str]:
        unknown = set(value) - set(DEFAULT_FINAL_MASK)
        if unknown:
            raise ValueError(f"unknown structure(s) {sorted(unknown)}; use "
                             f"{', '.join(DEFAULT_FINAL_MASK)}")
        return {**DEFAULT_FINAL_MASK, **value}


class ResultsConfig(_Section):
    """How result series appear in the PACS."""

    # What the SEG and SR encoders accept (IS: a positive number; LO: 64 characters, no
    # backslash or control characters), checked at start rather than at the first study.
    seg_series_number: int = Field(9901, ge=1, le=2147483647)
    seg_series_description: str = Field("pacsnode segmentation", max_length=64)
    sr_series_number: int = Field(9902, ge=1, le=2147483647)
    sr_series_description: str = Field("pacsnode measurements", max_length=64)

    @field_validator("seg_series_description", "sr_series_description")
    @classmethod
    def _long_string(cls, value: str) -> str:
        if "\\" in value or any(ord(c) < 32 for c in value):
            raise ValueError("must not contain a backslash or control characters (DICOM LO)")
        return value


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
    security: SecurityConfig = SecurityConfig()
    storage: StorageConfig = StorageConfig()
    database: DatabaseConfig = DatabaseConfig()
    study: StudyConfig = StudyConfig()
    destinations: list[Destination] = []
    routes: list[Route] = DEFAULT_ROUTES
    models: list[ModelConfig] = []
    segmentation: SegmentationConfig = SegmentationConfig()
    results: ResultsConfig = ResultsConfig()
    jobs: JobsConfig = JobsConfig()
    delivery: DeliveryConfig = DeliveryConfig()
    web: WebConfig = WebConfig()
    audit: AuditConfig = AuditConfig()
    logging: LoggingConfig = LoggingConfig()

    @model_validator(mode="after")
    def _names_resolve(self) -> Self:
        known = [dest.name for dest in self.destinations]
        if len(set(known)) != len(known):
            raise ValueError("destinations: names must be unique")
        models = [model.name for model in self.models]
        if len(set(models)) != len(models):
            raise ValueError("models: names must be unique")
        for number, route in enumerate(self.routes):
            if route.model is not None and route.model not in models:
                raise ValueError(
                    f"routes.{number}.model: no model named {route.model!r} "
                    f"(configured: {', '.join(models) or 'none'})"
                )
            for name in route.destinations or []:
                if name not in known:
                    raise ValueError(
                        f"routes.{number}.destinations: no destination named {name!r} "
                        f"(configured: {', '.join(known) or 'none'})"
                    )
        return self

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

    def route_destinations(self, route: Route) -> list[str]:
        if route.destinations is None:
            return [dest.name for dest in self.destinations]
        return list(route.destinations)

    def check_pipelines(self, known: list[str]) -> None:
        """Refuse routes naming a pipeline that does not exist (checked where it runs)."""
        for number, route in enumerate(self.routes):
            if route.pipeline not in known:
                raise ConfigError(
                    f"invalid configuration:\n  routes.{number}.pipeline: no pipeline named "
                    f"{route.pipeline!r} (known: {', '.join(known)})"
                )

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
        message = item["msg"].removeprefix("Value error, ")
        if not item["loc"]:  # a check across sections names its keys itself
            lines.append(message)
            continue
        key = ".".join(str(part) for part in item["loc"])
        value = item.get("input")
        shown = "" if isinstance(value, (dict, list)) or value is None else f" (got {value!r})"
        lines.append(f"{key}: {message}{shown}")
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
