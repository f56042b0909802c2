"""Users, roles, sessions, CSRF, lock-out and tokens, through the node's real web port."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import requests

from tests.conftest import query
from tests.web_helpers import PASSWORD, add_user, cli, csrf_of, logged_in, login


def _node(make_node: Any, **env: str) -> Any:
    return make_node(extra_env={"PACSNODE__WEB__LOCKOUT_ATTEMPTS": "3", **env})


def test_pages_redirect_to_login_and_the_api_answers_401(make_node: Any) -> None:
    node = _node(make_node)
    url = node.web_url
    page = requests.get(f"{url}/studies?patient_id=X", allow_redirects=False, timeout=10)
    assert page.status_code == 303
    assert page.headers["location"] == "/login?next=%2Fstudies%3Fpatient_id%3DX"
    api = requests.get(f"{url}/api/studies", timeout=10)
    assert api.status_code == 401 and api.headers["www-authenticate"] == "Bearer"
    assert requests.get(f"{url}/api/studies", headers={"Authorization": "Bearer nope"},
                        timeout=10).status_code == 401
    # The operations endpoints need no login.
    assert requests.get(f"{url}/health", timeout=10).json() == {"status": "ok"}


def test_login_sets_a_strict_http_only_session_and_logout_ends_it(make_node: Any) -> None:
    node = _node(make_node)
    add_user(node, "alice", "viewer")
    session, response = login(node.web_url, "alice", next="/studies")
    assert response.url.endswith("/studies") and "alice (viewer)" in response.text
    cookie = response.history[0].headers["set-cookie"]
    assert "pacsnode_session=" in cookie and "HttpOnly" in cookie
    assert "SameSite=strict" in cookie and "Secure" not in cookie  # plain HTTP here
    token = csrf_of(response.text)
    session.post(f"{node.web_url}/logout", data={"csrf_token": token}, timeout=10)
    again = session.get(f"{node.web_url}/studies", allow_redirects=False, timeout=10)
    assert again.status_code == 303
    actions = [r["action"] for r in query(node.db_url,
                                          "SELECT action FROM access_log ORDER BY id")]
    assert actions == ["user_add", "login", "search", "logout"]


def test_an_open_redirect_is_refused(make_node: Any) -> None:
    node = _node(make_node)
    add_user(node, "alice", "viewer")
    _session, response = login(node.web_url, "alice", next="//evil.example/")
    assert response.url == f"{node.web_url}/"


def test_repeated_failures_lock_the_account(make_node: Any) -> None:
    node = _node(make_node)
    add_user(node, "bob", "auditor")
    for _ in range(3):
        _s, response = login(node.web_url, "bob", "wrong password!!")
        assert "Wrong user name or password" in response.text
    # Locked now: the right password does not open it either.
    _s, response = login(node.web_url, "bob", PASSWORD)
    assert "Wrong user name or password" in response.text
    rows = query(node.db_url, "SELECT action, outcome, detail FROM access_log "
                 "WHERE action != 'user_add' ORDER BY id")
    assert [r["action"] for r in rows] == ["login_failed"] * 4
    assert rows[2]["detail"] == "wrong password; account now locked"
    assert rows[3]["detail"] == "account locked"
    assert "locked until" in cli(node, "user", "list").stdout
    # A new password (an administrator's act) unlocks it.
    assert cli(node, "user", "passwd", "bob", "--password-stdin",
               stdin="another long password\n").returncode == 0
    logged_in(node.web_url, "bob", "another long password")


def test_a_post_without_the_csrf_token_is_refused(make_node: Any, tmp_path: Path) -> None:
    node = _node(make_node)
    add_user(node, "root", "admin")
    session = logged_in(node.web_url, "root")
    forged = session.post(f"{node.web_url}/deliveries/resend-failed", data={}, timeout=10)
    assert forged.status_code == 403 and "CSRF" in forged.text
    api = session.post(f"{node.web_url}/api/deliveries/resend-failed", timeout=10)
    assert api.status_code == 403
    page = session.get(f"{node.web_url}/deliveries", timeout=10)
    ok = session.post(f"{node.web_url}/api/deliveries/resend-failed", timeout=10,
                      headers={"X-CSRF-Token": csrf_of(page.text)})
    assert ok.status_code == 200 and ok.json() == {"resent": []}
    # The login form itself needs its token too.
    bare = requests.post(f"{node.web_url}/login", data={"username": "root",
                         "password": PASSWORD}, allow_redirects=False, timeout=10)
    assert bare.headers["location"] == "/login?error=stale"


def test_roles(make_node: Any) -> None:
    node = _node(make_node)
    add_user(node, "vera", "viewer")
    add_user(node, "otto", "auditor")
    viewer, auditor = logged_in(node.web_url, "vera"), logged_in(node.web_url, "otto")
    assert viewer.get(f"{node.web_url}/access-log", timeout=10).status_code == 403
    assert auditor.get(f"{node.web_url}/access-log", timeout=10).status_code == 200
    page = auditor.get(f"{node.web_url}/deliveries", timeout=10)
    assert "Resend" not in page.text
    refused = auditor.post(f"{node.web_url}/api/deliveries/resend-failed", timeout=10,
                           headers={"X-CSRF-Token": csrf_of(page.text)})
    assert refused.status_code == 403 and "admin role" in refused.json()["detail"]
    denied = query(node.db_url, "SELECT username, outcome, detail FROM access_log "
                   "WHERE action = 'denied' ORDER BY id")
    assert [d["username"] for d in denied] == ["vera", "otto"]


def test_tokens_and_the_static_token(make_node: Any) -> None:
    static = "s" * 40
    node = _node(make_node, PACSNODE__WEB__API_TOKEN=static)
    add_user(node, "script", "auditor")
    made = cli(node, "token", "create", "--user", "script", "--name", "nightly export")
    token = made.stdout.strip()
    assert made.returncode == 0 and token.startswith("pn_")
    stored = query(node.db_url, "SELECT token_hash FROM api_tokens")
    assert token not in json.dumps(stored) and len(stored[0]["token_hash"]) == 64
    for bearer in (token, static):
        answer = requests.get(f"{node.web_url}/api/studies",
                              headers={"Authorization": f"Bearer {bearer}"}, timeout=10)
        assert answer.status_code == 200 and answer.json()["total"] == 0
    # A Bearer request needs no CSRF token; an auditor's still may not act.
    refused = requests.post(f"{node.web_url}/api/deliveries/resend-failed", timeout=10,
                            headers={"Authorization": f"Bearer {token}"})
    assert refused.status_code == 403
    assert cli(node, "user", "remove", "script").returncode == 0
    assert requests.get(f"{node.web_url}/api/studies", timeout=10,
                        headers={"Authorization": f"Bearer {token}"}).status_code == 401
    who = {r["username"] for r in query(node.db_url, "SELECT username FROM access_log")}
    assert {"script", "api-token"} <= who and any(w.startswith("cli:") for w in who)


def test_user_commands(make_node: Any) -> None:
    node = _node(make_node)
    short = cli(node, "user", "add", "x", "--role", "admin", "--password-stdin", stdin="short\n")
    assert short.returncode == 2 and "at least 12 characters" in short.stderr
    add_user(node, "carol", "admin")
    twice = cli(node, "user", "add", "carol", "--role", "viewer", "--password-stdin",
                stdin=PASSWORD + "\n")
    assert twice.returncode == 2 and "exists already" in twice.stderr
    listed = json.loads(cli(node, "user", "list", "--json").stdout)
    assert [(u["name"], u["role"]) for u in listed] == [("carol", "admin")]
    stored = query(node.db_url, "SELECT password_hash FROM users")[0]["password_hash"]
    assert stored.startswith("$argon2id$") and PASSWORD not in stored
    session = logged_in(node.web_url, "carol")
    assert cli(node, "user", "passwd", "carol", "--password-stdin",
               stdin="a new long password\n").returncode == 0
    # A password change ends the sessions opened with the old one.
    assert session.get(f"{node.web_url}/", allow_redirects=False, timeout=10).status_code == 303
    assert cli(node, "user", "remove", "nobody").returncode == 2
