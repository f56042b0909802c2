"""Who may open an association: calling AE titles allowed from hosts (``security``).

Checked when an A-ASSOCIATE-RQ arrives, before anything is negotiated; a peer that is
not allowed gets an A-ASSOCIATE-RJ (rejected-permanent, service user, "calling AE
title not recognised"), as PS3.8 7.1.1.9 defines for an unknown calling AE. Host names
are resolved when the policy is built (at start, and on reload: ``pacsnode serve`` reads
its configuration again on SIGHUP), so a DNS failure in between cannot open or close
the door mid-run.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Iterable
from dataclasses import dataclass

from node.config import ConfigError, SecurityConfig

log = logging.getLogger(__name__)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class _Allowed:
    ae_title: str
    networks: tuple[Network, ...]
    host: str  # as configured, for messages


class CallingAEPolicy:
    """Decides whether a calling AE title from a peer address may associate.

    Parameters
    ----------
    config
        The ``security`` section.

    Raises
    ------
    ConfigError
        If a host name in ``security.allowed_calling_aes`` does not resolve.
    """

    def __init__(self, config: SecurityConfig) -> None:
        self.accept_any = config.accept_any_calling_ae
        self.loopback_only = not config.accept_any_calling_ae and not config.allowed_calling_aes
        self._allowed = tuple(
            _Allowed(peer.ae_title, _networks(peer.host, f"security.allowed_calling_aes.{n}.host"),
                     peer.host)
            for n, peer in enumerate(config.allowed_calling_aes)
        )

    def describe(self) -> str:
        """One line for the start-up log: what is accepted, and how to change it."""
        if self.accept_any:
            return "accepting associations from any host and calling AE title " \
                   "(security.accept_any_calling_ae: true)"
        if self.loopback_only:
            return ("accepting associations from loopback addresses only: list the peers "
                    "that may send under security.allowed_calling_aes ({ae_title, host}), "
                    "or set security.accept_any_calling_ae: true")
        peers = ", ".join(f"{a.ae_title}@{a.host}" for a in self._allowed)
        return f"accepting associations from {peers}"

    def refusal(self, calling_ae: str, peer_address: str) -> str | None:
        """Why ``calling_ae`` from ``peer_address`` may not associate; ``None`` if it may."""
        if self.accept_any:
            return None
        address = _address(peer_address)
        if self.loopback_only:
            if address is not None and address.is_loopback:
                return None
            return (f"only loopback peers are accepted without security.allowed_calling_aes; "
                    f"{peer_address} is not one")
        titled = [a for a in self._allowed if a.ae_title == calling_ae.strip()]
        if not titled:
            return f"calling AE title {calling_ae.strip()!r} is not in security.allowed_calling_aes"
        if address is not None and any(address in net for a in titled for net in a.networks):
            return None
        hosts = ", ".join(a.host for a in titled)
        return f"calling AE title {calling_ae.strip()!r} is allowed from {hosts}, not from {peer_address}"


def _address(text: str) -> Address | None:
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    # An IPv4 peer on a dual-stack socket shows as ::ffff:a.b.c.d.
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _networks(host: str, key: str) -> tuple[Network, ...]:
    try:
        return (ipaddress.ip_network(host, strict=False),)
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError as exc:
        raise ConfigError(f"invalid configuration:\n  {key}: cannot resolve {host!r} "
                          f"({exc.strerror or exc})") from None
    return tuple(_unique(ipaddress.ip_network(info[4][0].split("%", 1)[0]) for info in infos))


def _unique(networks: Iterable[Network]) -> list[Network]:
    return list(dict.fromkeys(networks))
