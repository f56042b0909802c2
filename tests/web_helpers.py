"""Talking to a node's web application as a browser or a script would: real HTTP on
the node's web port, the login form with its CSRF token, Bearer tokens."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from typing import Any

import requests

from tests.conftest import PACSNODE

PASSWORD = "correct horse battery staple"


def add_user(node: Any, name: str, role: str, password: str = PASSWORD) -> None:
    result = subprocess.run([*PACSNODE, "user", "add", name, "--role", role,
                             "--password-stdin"], input=password + "\n", env=node.env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def wait_web(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/health", timeout=2, verify=False).ok:
                return
        except requests.RequestException:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"no web application at {url}")


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert found, "the page has no CSRF token"
    return found.group(1)


def login(url: str, name: str, password: str = PASSWORD, **kwargs: Any
          ) -> tuple[requests.Session, requests.Response]:
    """Log in through the form; returns the session and the final response."""
    session = requests.Session()
    # Per request: requests lets REQUESTS_CA_BUNDLE override a session's verify.
    verify = kwargs.pop("verify", False)
    form = session.get(f"{url}/login", timeout=10, verify=verify)
    response = session.post(f"{url}/login", data={
        "username": name, "password": password, "csrf_token": csrf_of(form.text),
        "next": kwargs.get("next", "/")}, timeout=30, verify=verify)
    return session, response


def logged_in(url: str, name: str, password: str = PASSWORD) -> requests.Session:
    session, response = login(url, name, password)
    assert response.ok and "/login" not in response.url, f"login of {name} failed"
    return session


def cli(node: Any, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "node.cli", *args], input=stdin, env=node.env,
                          capture_output=True, text=True, timeout=60)
