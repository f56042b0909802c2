"""A local syslog collector (an audit record repository) for the ATNA tests: RFC 5426
UDP datagrams, RFC 6587 octet-counted TCP, RFC 5425 TLS; every message parsed as RFC
5424 with its XML."""

from __future__ import annotations

import functools
import re
import socket
import ssl
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

_HEADER = re.compile(rb"^<(\d{1,3})>1 (\S+) (\S+) (\S+) (\S+) (\S+) (-|\[.*?\]) (.*)$", re.S)


@dataclass
class Received:
    priority: int
    timestamp: str
    hostname: str
    app: str
    msgid: str
    xml: ET.Element


@dataclass
class SyslogListener:
    transport: str
    context: ssl.SSLContext | None = None
    messages: list[Received] = field(default_factory=list)
    port: int = 0

    def start(self) -> SyslogListener:
        kind = socket.SOCK_DGRAM if self.transport == "udp" else socket.SOCK_STREAM
        self._sock = socket.socket(socket.AF_INET, kind)
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        if kind == socket.SOCK_STREAM:
            self._sock.listen(8)
        target = self._udp if self.transport == "udp" else self._accept
        threading.Thread(target=target, daemon=True).start()
        return self

    def close(self) -> None:
        self._sock.close()

    def _add(self, payload: bytes) -> None:
        match = _HEADER.match(payload)
        assert match, f"not an RFC 5424 message: {payload[:120]!r}"
        body = match.group(8)
        assert body.startswith(b"\xef\xbb\xbf"), "the UTF-8 message starts with a BOM"
        self.messages.append(Received(
            int(match.group(1)), match.group(2).decode(), match.group(3).decode(),
            match.group(4).decode(), match.group(6).decode(), ET.fromstring(body[3:])))

    def _udp(self) -> None:
        while True:
            try:
                data, _ = self._sock.recvfrom(65535)
            except OSError:
                return
            self._add(data)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._stream, args=(conn,), daemon=True).start()

    def _stream(self, conn: socket.socket) -> None:
        if self.context is not None:
            conn = self.context.wrap_socket(conn, server_side=True)
        buffer = b""
        with conn:
            while chunk := conn.recv(65536):
                buffer += chunk
                while b" " in buffer:
                    length, _, rest = buffer.partition(b" ")
                    size = int(length)  # octet counting: "LEN SP MSG"
                    if len(rest) < size:
                        break
                    self._add(rest[:size])
                    buffer = rest[size:]

    def wait_for(self, event_id: str, timeout: float = 30, **attrs: str) -> Received:
        """The first message with this EventID (csd-code), and EventIdentification
        attributes ``attrs`` (``EventActionCode="C"``, say)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for message in list(self.messages):
                ident = message.xml.find("EventIdentification")
                if ident is None:
                    continue
                code = ident.find("EventID")
                if code is not None and code.get("csd-code") == event_id and all(
                        ident.get(k) == v for k, v in attrs.items()):
                    return message
            time.sleep(0.05)
        seen = [m.xml.find("EventIdentification/EventID").get("originalText")  # type: ignore[union-attr]
                for m in self.messages]
        raise AssertionError(f"no audit message {event_id} {attrs} after {timeout} s; got {seen}")


SCHEMA = Path(__file__).parent / "schemas" / "dicom-audit-message.rng"


@functools.cache
def _schema() -> Any:
    from lxml import etree

    return etree.RelaxNG(etree.parse(str(SCHEMA)))


def check_audit_message(root: ET.Element) -> None:
    """Valid against the DICOM audit message schema (PS3.15 A.5.1), plus the
    conventions of A.5.2 that a schema cannot say: a time zone on EventDateTime."""
    from lxml import etree

    schema = _schema()
    document = etree.fromstring(ET.tostring(root))
    assert schema.validate(document), f"{schema.error_log}\n{ET.tostring(root).decode()}"
    ident = root.find("EventIdentification")
    assert ident is not None
    assert datetime.fromisoformat(ident.get("EventDateTime", "")).tzinfo is not None


def objects(root: ET.Element, id_type: str) -> list[ET.Element]:
    """Participant objects whose ID type code is ``id_type`` (110180: study, 2: patient)."""
    return [o for o in root.findall("ParticipantObjectIdentification")
            if o[0].get("csd-code") == id_type]


def participants(root: ET.Element) -> list[dict[str, Any]]:
    return [dict(p.attrib, role=(p.find("RoleIDCode").get("csd-code")  # type: ignore[union-attr]
                                 if p.find("RoleIDCode") is not None else None))
            for p in root.findall("ActiveParticipant")]
