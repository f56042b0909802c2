"""The ``web`` and ``audit`` sections of the configuration (see :mod:`node.config`).

Kept apart from :mod:`node.config` so that each stays a readable size; the rules are
the same: unknown keys are errors, and every message names its key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

Role = Literal["admin", "auditor", "viewer"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class WebTLS(_Section):
    """HTTPS for the dashboard and API: the server's certificate and key (PEM)."""

    certificate: Path
    private_key: Path


class WebConfig(_Section):
    """The HTTP dashboard, REST API and operations endpoints."""

    enabled: bool = Field(True, description="pacsnode serve also serves the web application")
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535, description="0 binds a free port (tests)")
    tls: WebTLS | None = Field(None, description="serve HTTPS with this certificate and key")
    api_token: str | None = Field(
        None, min_length=32, description="a static Bearer token for automation (unset: none)"
    )
    api_token_role: Role = Field("auditor", description="what web.api_token may do")
    session_idle_s: float = Field(
        1800.0, gt=0, description="a session unused this long ends (log in again)"
    )
    session_max_s: float = Field(43200.0, gt=0, description="a session ends this long after login")
    lockout_attempts: int = Field(
        5, ge=1, description="consecutive failed logins before the account is locked"
    )
    lockout_s: float = Field(900.0, gt=0, description="how long a locked account stays locked")
    page_size: int = Field(50, ge=1, le=1000, description="rows per page of a list")


class SyslogConfig(_Section):
    """Where IHE ATNA audit messages go: an audit record repository (RFC 5424 syslog)."""

    host: str = Field(min_length=1)
    port: int = Field(514, ge=1, le=65535)
    transport: Literal["udp", "tcp", "tls"] = "tls"
    ca_certificates: Path | None = Field(
        None, description="tls: the CA bundle the repository's certificate is signed by"
    )
    certificate: Path | None = Field(None, description="tls: our client certificate (PEM)")
    private_key: Path | None = Field(None, description="tls: the key of certificate")

    @model_validator(mode="after")
    def _tls_files(self) -> Self:
        if self.transport == "tls" and self.ca_certificates is None:
            raise ValueError("transport tls needs ca_certificates (to verify the repository)")
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("certificate and private_key go together (give both or neither)")
        return self


class AuditConfig(_Section):
    """IHE ATNA audit messages (DICOM PS3.15 A.5) sent to a syslog collector."""

    syslog: SyslogConfig | None = Field(None, description="unset: no ATNA messages are sent")
    source_id: str | None = Field(
        None, max_length=64, description="AuditSourceID (default: node.ae_title@host name)"
    )
    enterprise_site_id: str = Field("", max_length=64, description="AuditEnterpriseSiteID")
