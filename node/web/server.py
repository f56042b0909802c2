"""The web application's HTTP(S) server: uvicorn in a thread of its own, so a page, a
search or a scrape never holds up the DICOM listener or the workers.

``pacsnode serve`` starts it from :class:`node.app.Node` (``web.enabled``); ``pacsnode
web`` runs it alone for deployments that scale receivers and the UI apart.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable

from sqlalchemy import Engine

from node.config import ConfigError, Settings

log = logging.getLogger("pacsnode")


class WebServer:
    """uvicorn serving :func:`node.web.app.create_app` on ``web.host:web.port``."""

    def __init__(self, settings: Settings, engine: Engine,
                 dicom_ports: Callable[[], list[int]] = list) -> None:
        self.settings = settings
        self.engine = engine
        self.dicom_ports = dicom_ports
        self.port: int | None = None
        self._server: object | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> int:
        """Bind, start serving in a thread, and return the port.

        Raises
        ------
        OSError
            The address is taken or cannot be bound.
        node.config.ConfigError
            ``web.tls`` names a certificate or key that does not load.
        """
        import uvicorn

        from node.web.app import WebContext, create_app

        web = self.settings.web
        tls = _tls_files(web.tls) if web.tls else {}
        sock = _bind(web.host, web.port)
        self.port = int(sock.getsockname()[1])
        app = create_app(WebContext(self.settings, self.engine, self.dicom_ports))
        config = uvicorn.Config(app, log_level="warning", access_log=False,
                                proxy_headers=False, server_header=False, **tls)
        server = self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]},
                                        name="web", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 15
        while not server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        if not server.started:
            self.stop()
            raise OSError(f"the web server did not start on {web.host}:{self.port}")
        log.info("web: %s://%s:%s/ (API docs at /api/docs)", "https" if tls else "http",
                 web.host, self.port)
        return self.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True  # type: ignore[attr-defined]
        if self._thread is not None:
            self._thread.join(10)
        self._server = self._thread = None


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"web.port: cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def _tls_files(tls: object) -> dict[str, str]:
    """uvicorn's TLS options, the pair checked now so a bad file names its key."""
    certificate, key = str(tls.certificate), str(tls.private_key)  # type: ignore[attr-defined]
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(certificate, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"invalid configuration:\n  web.tls: cannot load certificate "
                          f"{certificate} with key {key}: {exc}") from None
    return {"ssl_certfile": certificate, "ssl_keyfile": key}
