"""DICOM TLS (PS3.15 Annex B, the BCP 195 profile): TLS 1.2 or newer, forward-secret AEAD
ciphers only, no compression or renegotiation.

Two sides:

- the node's TLS listener (``node.tls``): :func:`server_context`, and
  :class:`TLSAssociationServer`, which leaves the handshake to the connection's own
  thread (pynetdicom's server shakes hands in its accept loop, where one silent peer
  would stall every other connection);
- deliveries and ``pacsnode echo/send`` to a TLS peer (``destinations[].tls``,
  ``--tls-ca/--tls-cert/--tls-key``): :class:`ClientTLS`, which verifies the peer's
  certificate against the configured CA and its host name or IP address against the
  certificate's subjectAltName.

Certificates and keys are read each time a context is built: the listener's on start
and on reload, a client's for each association, so replaced files take effect without
a restart.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pynetdicom.transport import ThreadedAssociationServer

from node.config import ConfigError, ListenerTLS, PeerTLS

# BCP 195 (RFC 9325) 4.2: ECDHE or DHE key exchange with AES-GCM or ChaCha20-Poly1305
# for TLS 1.2; TLS 1.3's suites are all of that kind and are not affected by this list.
_BCP195_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!eNULL"


def _harden(context: ssl.SSLContext) -> None:
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(_BCP195_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION


#: The command-line options of ``pacsnode echo/send`` that give the same files.
_OPTIONS = {"ca_certificates": "--tls-ca", "certificate": "--tls-cert",
            "private_key": "--tls-key"}


def _name(key: str, field: str) -> str:
    """``node.tls.certificate``, or the option's name for the command line (``--tls``)."""
    return _OPTIONS[field] if key == "--tls" else f"{key}.{field}"


def _load_chain(context: ssl.SSLContext, certificate: Path, private_key: Path | None,
                key: str) -> None:
    try:
        context.load_cert_chain(certificate, private_key)
    except FileNotFoundError as exc:
        raise ConfigError(f"invalid configuration:\n  {_name(key, 'certificate')}: "
                          f"{exc.filename} does not exist") from None
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"invalid configuration:\n  {_name(key, 'certificate')}/"
            f"{_name(key, 'private_key')}: cannot load "
            f"{certificate} with its key ({_why(exc)}); both must be PEM, the key "
            "unencrypted and matching the certificate") from None


def _load_ca(context: ssl.SSLContext, ca_certificates: Path, key: str) -> None:
    try:
        context.load_verify_locations(cafile=ca_certificates)
    except FileNotFoundError:
        raise ConfigError(f"invalid configuration:\n  {_name(key, 'ca_certificates')}: "
                          f"{ca_certificates} does not exist") from None
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"invalid configuration:\n  {_name(key, 'ca_certificates')}: "
                          "cannot load "
                          f"{ca_certificates} ({_why(exc)}); it must hold PEM "
                          "certificates") from None


def _why(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or exc.strerror or str(exc)
    return getattr(exc, "strerror", None) or str(exc)


def server_context(config: ListenerTLS, key: str = "node.tls") -> ssl.SSLContext:
    """The listener's context: its certificate, and the CA that client certificates
    must be signed by (required when ``require_client_certificate``).

    Raises
    ------
    ConfigError
        A file is missing or unreadable; the message names its key.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _harden(context)
    context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    _load_chain(context, config.certificate, config.private_key, key)
    if config.ca_certificates is not None:
        _load_ca(context, config.ca_certificates, key)
    if config.require_client_certificate:
        context.verify_mode = ssl.CERT_REQUIRED
    elif config.ca_certificates is not None:
        context.verify_mode = ssl.CERT_OPTIONAL
    return context


class _ReportingSocket(ssl.SSLSocket):
    """Keeps the handshake's error on its context: pynetdicom logs it and reports only
    that the association failed, and an administrator needs to know why."""

    def connect(self, address: Any) -> None:
        try:
            super().connect(address)
        except (ssl.SSLError, ssl.CertificateError) as exc:
            self.context.handshake_error = exc  # type: ignore[attr-defined]
            raise


@dataclass(frozen=True)
class ClientTLS:
    """TLS towards a peer: the CA its certificate must be signed by, and our own
    certificate and key when the peer asks for one."""

    ca_certificates: Path
    certificate: Path | None = None
    private_key: Path | None = None
    key: str = "tls"  # the configuration key (or option) the files came from

    @classmethod
    def from_config(cls, config: PeerTLS, key: str) -> ClientTLS:
        return cls(config.ca_certificates, config.certificate, config.private_key, key)

    def context(self) -> ssl.SSLContext:
        """A new context for one association (host name checking on).

        Raises
        ------
        ConfigError
            A file is missing or unreadable.
        """
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        _harden(context)
        context.sslsocket_class = _ReportingSocket
        _load_ca(context, self.ca_certificates, self.key)
        if self.certificate is not None:
            _load_chain(context, self.certificate, self.private_key, self.key)
        return context


def handshake_failure(context: ssl.SSLContext | None) -> str:
    """Why the last handshake on ``context`` failed, or ``""``."""
    error = getattr(context, "handshake_error", None) if context is not None else None
    if error is None:
        return ""
    if isinstance(error, ssl.SSLCertVerificationError):
        return error.verify_message or _why(error)
    return _why(error)


def peer_subject(sock: Any) -> str:
    """The subject of the peer's verified certificate, as ``CN=..., O=...``, or ``""``."""
    if not isinstance(sock, ssl.SSLSocket):
        return ""
    try:
        certificate = sock.getpeercert()
    except (ValueError, OSError):
        return ""
    if not certificate:
        return ""
    parts = [f"{_RDN_NAMES.get(name, name)}={value}"
             for rdn in reversed(certificate.get("subject", ())) for name, value in rdn]
    return ", ".join(parts)


# RFC 4514's short names, for the attributes Python spells out.
_RDN_NAMES = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU",
              "countryName": "C", "localityName": "L", "stateOrProvinceName": "ST",
              "domainComponent": "DC"}


class TLSAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, with the TLS handshake moved out of accept().

    The accepted socket is wrapped without shaking hands; the request handler
    (:class:`node.dicom.reactor.FastRequestHandler`) does it in the connection's thread,
    bounded by ``node.association_timeout_s``.
    """

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None
        client, address = self.socket.accept()
        context = self.ssl_context
        assert context is not None
        wrapped = context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
        return wrapped, address
