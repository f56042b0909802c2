"""HTTPS (web.tls): the node serves its pages over TLS, the session cookie is Secure, and
a configuration that cannot work is refused naming its key."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import requests

from tests.conftest import PACSNODE, free_port, require_tool
from tests.web_helpers import add_user, login

SCRIPTS = Path(__file__).resolve().parents[1] / "deploy" / "tls"


def test_https_and_a_secure_cookie(make_node: Any, tmp_path: Path) -> None:
    require_tool("openssl")
    pki = tmp_path / "pki"
    for args in (["make-ca.sh", str(pki)], ["make-cert.sh", str(pki), "web"]):
        subprocess.run([str(SCRIPTS / args[0]), *args[1:]], check=True, capture_output=True)
    tls = {"certificate": str(pki / "web.pem"), "private_key": str(pki / "web.key")}
    node = make_node(extra_env={"PACSNODE__WEB__TLS": json.dumps(tls)})
    assert node.web_url.startswith("https://")
    health = requests.get(f"{node.web_url}/health", verify=str(pki / "ca.pem"), timeout=10)
    assert health.json() == {"status": "ok"}
    assert health.headers["strict-transport-security"].startswith("max-age=")
    add_user(node, "ada", "admin")
    _session, response = login(node.web_url, "ada", verify=str(pki / "ca.pem"))
    cookie = response.history[0].headers["set-cookie"]
    assert "pacsnode_session=" in cookie and "Secure" in cookie and "HttpOnly" in cookie
    try:
        requests.get(node.web_url.replace("https", "http") + "/health", timeout=5)
    except requests.RequestException:
        pass
    else:
        raise AssertionError("plain HTTP was answered on the HTTPS port")


def test_web_keys_are_checked_and_named(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "PACSNODE__STORAGE__DATA_DIR": str(tmp_path / "var"),
           "PACSNODE__NODE__PORT": str(free_port()), "PACSNODE__WEB__PORT": str(free_port()),
           "PACSNODE__ROUTES": "[]", "PACSNODE__WEB__API_TOKEN": "short"}
    import os

    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PACSNODE")}, **env}
    result = subprocess.run([*PACSNODE, "studies"], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2 and "web.api_token: String should have at least 32" \
        in result.stderr
    env.pop("PACSNODE__WEB__API_TOKEN")
    env["PACSNODE__WEB__TLS"] = json.dumps({"certificate": str(tmp_path / "none.pem"),
                                            "private_key": str(tmp_path / "none.key")})
    env["PACSNODE__NODE__HOST"] = "127.0.0.1"
    result = subprocess.run([*PACSNODE, "serve"], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and "web.tls: cannot load certificate" in result.stderr
