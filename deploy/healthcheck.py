"""The container image's HEALTHCHECK: GET an operations endpoint of this container.

Usage: python healthcheck.py [PATH]   (PATH defaults to /ready)

The URL comes from the node's own configuration (the file and PACSNODE__* variables
the process was started with), so a changed ``web.port`` or ``web.tls`` cannot leave
the check probing the wrong port. It uses urllib only: the slim image has no curl.

Exit status 0 when the endpoint answers 2xx, 1 otherwise (Docker's "unhealthy").
There is nothing to check in a container running ``pacsnode worker`` or with
``web.enabled: false``: disable the check there (compose: ``healthcheck: disable``).
"""

from __future__ import annotations

import ssl
import sys
import urllib.error
import urllib.request
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from node.config_web import WebConfig

TIMEOUT_S = 4.0
_ANY_ADDRESS = ("", "0.0.0.0", "::")


def probe_url(web: WebConfig, path: str = "/ready") -> str:
    """The URL of ``path`` on this container's web server."""
    host = web.host
    # Bound to every address: probe over loopback (the check runs in the container).
    host = "127.0.0.1" if host in _ANY_ADDRESS else host
    if ":" in host:
        host = f"[{host}]"
    scheme = "https" if web.tls is not None else "http"
    return f"{scheme}://{host}:{web.port}{path}"


def check(url: str, timeout: float = TIMEOUT_S) -> tuple[bool, str]:
    """(healthy, what to print) for one GET of ``url``."""
    context = None
    if url.startswith("https:"):
        # Our own server, over loopback: its certificate names the public host name,
        # not 127.0.0.1, so it is not verified here (the probe carries no secret).
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as answer:
            return True, f"{url}: {answer.status}"
    except urllib.error.HTTPError as exc:  # /ready answers 503 with its failed checks
        body = exc.read(500).decode("utf-8", "replace")
        return False, f"{url}: {exc.code} {body}"
    except (urllib.error.URLError, OSError) as exc:
        return False, f"{url}: {getattr(exc, 'reason', exc)}"


def main(argv: list[str]) -> int:
    path = argv[1] if len(argv) > 1 else "/ready"
    from node.config import ConfigError, load_settings

    try:
        web = load_settings().web
    except ConfigError as exc:
        print(f"healthcheck: {exc}", file=sys.stderr)
        return 1
    if not web.enabled:
        print("healthcheck: web.enabled is false, nothing answers HTTP here", file=sys.stderr)
        return 1
    healthy, message = check(probe_url(web, path))
    print(message, file=sys.stdout if healthy else sys.stderr)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
