"""Who may talk to the node: calling AE titles allowed from hosts, loopback-only by
default, every rejection logged and recorded with its reason."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from node.config import ConfigError, SecurityConfig
from node.dicom.access import CallingAEPolicy
from tests.conftest import PACSNODE, NodeProcess, dcmtk_env, query, require_tool


def policy(**security: Any) -> CallingAEPolicy:
    return CallingAEPolicy(SecurityConfig.model_validate(security))


def test_without_a_list_only_loopback_peers_are_accepted() -> None:
    default = policy()
    for address in ("127.0.0.1", "127.3.4.5", "::1", "::ffff:127.0.0.1"):
        assert default.refusal("ANY", address) is None, address
    for address in ("10.1.2.3", "192.168.0.7", "::ffff:10.0.0.1", "2001:db8::1"):
        reason = default.refusal("ANY", address)
        assert reason is not None and address in reason and "allowed_calling_aes" in reason
    assert "security.accept_any_calling_ae" in default.describe()
    assert policy(accept_any_calling_ae=True).refusal("ANY", "10.1.2.3") is None


def test_a_list_allows_each_title_from_its_hosts_only() -> None:
    allowed = policy(allowed_calling_aes=[
        {"ae_title": "CT1", "host": "10.0.0.0/24"},
        {"ae_title": "MR1", "host": "10.9.9.9"},
        {"ae_title": "LOCAL", "host": "localhost"},  # a name, resolved now
    ])
    assert allowed.refusal("CT1", "10.0.0.77") is None
    assert allowed.refusal("MR1", "::ffff:10.9.9.9") is None
    assert allowed.refusal("LOCAL", "127.0.0.1") is None
    assert "allowed from 10.0.0.0/24, not from 10.0.1.1" in str(allowed.refusal("CT1", "10.0.1.1"))
    assert "'XR1' is not in security.allowed_calling_aes" in str(allowed.refusal("XR1", "10.0.0.7"))
    # The list replaces the loopback default: an unlisted title from loopback is refused.
    assert allowed.refusal("ANY", "127.0.0.1") is not None


def test_an_unresolvable_host_name_is_a_configuration_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_dns(*_args: Any, **_kwargs: Any) -> Any:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    with pytest.raises(ConfigError, match=r"security\.allowed_calling_aes\.1\.host: cannot "
                                          r"resolve 'pacs\.example'"):
        policy(allowed_calling_aes=[{"ae_title": "A", "host": "10.0.0.1"},
                                    {"ae_title": "B", "host": "pacs.example"}])


def test_a_bad_host_or_both_policies_are_refused_at_start_naming_the_key(tmp_path: Path) -> None:
    cases = {
        '{"allowed_calling_aes": [{"ae_title": "A", "host": "no such host!"}]}':
            "security.allowed_calling_aes.0.host",
        '{"allowed_calling_aes": [{"ae_title": "A", "host": "::1"}], "accept_any_calling_ae": true}':
            "security.accept_any_calling_ae",
    }
    for value, key in cases.items():
        env = {"PATH": "/usr/bin:/bin", "PACSNODE__STORAGE__DATA_DIR": str(tmp_path / "var"),
               "PACSNODE__SECURITY": value}
        result = subprocess.run([*PACSNODE, "serve"], env=env, capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 2, result.stderr
        assert key in result.stderr and "Traceback" not in result.stderr, result.stderr


def echo_from(node: NodeProcess, calling: str, bind: str) -> bool:
    """C-ECHO from a chosen loopback source address (DCMTK cannot choose one)."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title, bind_address=(bind, 0))
    if not assoc.is_established:
        return False
    assoc.release()
    return True


def association(node: NodeProcess, calling: str, host: str) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while True:
        rows = query(node.db_url, "SELECT outcome, reason, peer_host FROM associations "
                     "WHERE calling_ae = :calling AND peer_host = :host ORDER BY id DESC",
                     calling=calling, host=host)
        if rows and rows[0]["outcome"] != "open":
            return rows[0]
        assert time.monotonic() < deadline, f"no closed association of {calling} from {host}"
        time.sleep(0.1)


def test_the_node_rejects_and_records_who_is_not_on_its_list(make_node: Any) -> None:
    require_tool("echoscu")
    allowed = [{"ae_title": "GOODSCU", "host": "127.0.0.1"},
               {"ae_title": "OTHERSCU", "host": "127.0.0.2/32"}]
    node = make_node(extra_env={"PACSNODE__SECURITY__ALLOWED_CALLING_AES": json.dumps(allowed)})
    run = [("echoscu", "-v", "-aet", title, "-aec", node.ae_title, "127.0.0.1", str(node.port))
           for title in ("GOODSCU", "EVILSCU")]
    good = subprocess.run(run[0], env=dcmtk_env(), capture_output=True, text=True, timeout=60)
    assert good.returncode == 0, good.stdout + good.stderr
    evil = subprocess.run(run[1], env=dcmtk_env(), capture_output=True, text=True, timeout=60)
    assert evil.returncode != 0
    assert "Calling AE Title Not Recognized" in evil.stdout + evil.stderr

    assert echo_from(node, "OTHERSCU", "127.0.0.2")
    assert not echo_from(node, "OTHERSCU", "127.0.0.1")

    assert association(node, "GOODSCU", "127.0.0.1")["outcome"] == "released"
    assert association(node, "OTHERSCU", "127.0.0.2") == {
        "outcome": "released", "reason": None, "peer_host": "127.0.0.2"}
    evil_row = association(node, "EVILSCU", "127.0.0.1")
    assert evil_row["outcome"] == "rejected"
    assert evil_row["reason"] == "calling AE title 'EVILSCU' is not in security.allowed_calling_aes"
    wrong_host = association(node, "OTHERSCU", "127.0.0.1")
    assert wrong_host["outcome"] == "rejected"
    assert wrong_host["reason"] == ("calling AE title 'OTHERSCU' is allowed from 127.0.0.2/32, "
                                    "not from 127.0.0.1")
    log = node.log()
    assert "WARNING" in log and "rejected association from EVILSCU (127.0.0.1)" in log
    assert "accepting associations from GOODSCU@127.0.0.1, OTHERSCU@127.0.0.2/32" in log


def test_a_wrong_called_ae_title_is_recorded_with_its_reason(sqlite_node: NodeProcess) -> None:
    ae = AE(ae_title="ECHOSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", sqlite_node.port, ae_title="NOTME")
    assert assoc.is_rejected
    row = association(sqlite_node, "ECHOSCU", "127.0.0.1")
    assert row["outcome"] == "rejected"
    assert row["reason"] == "called AE title 'NOTME' is not ours (PACSNODE)"
    assert "accepting associations from loopback addresses only" in sqlite_node.log()


@pytest.fixture
def other_host() -> Any:
    """A second host on this machine: a network namespace joined by a veth pair
    (10.254.x.1 here, 10.254.x.2 there), so a peer arrives from a non-loopback address."""
    import os
    import shutil

    if shutil.which("ip") is None or os.geteuid() != 0:
        pytest.skip("needs root and iproute2 to make a network namespace")
    tag = f"{os.getpid() % 200 + 20}"
    name, here, there = f"pn{tag}", f"pnh{tag}", f"pnt{tag}"
    local, remote = f"10.254.{tag}.1", f"10.254.{tag}.2"
    steps = [["ip", "netns", "add", name],
             ["ip", "link", "add", here, "type", "veth", "peer", "name", there],
             ["ip", "link", "set", there, "netns", name],
             ["ip", "addr", "add", f"{local}/30", "dev", here],
             ["ip", "link", "set", here, "up"],
             ["ip", "netns", "exec", name, "ip", "addr", "add", f"{remote}/30", "dev", there],
             ["ip", "netns", "exec", name, "ip", "link", "set", there, "up"],
             ["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"]]
    try:
        for step in steps:
            done = subprocess.run(step, capture_output=True, text=True)
            if done.returncode != 0:
                pytest.skip(f"cannot make a test host ({' '.join(step)}: {done.stderr.strip()})")
        yield name, local, remote
    finally:
        subprocess.run(["ip", "link", "del", here], capture_output=True)
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def test_by_default_a_peer_on_another_host_is_rejected(other_host: Any, make_node: Any) -> None:
    require_tool("echoscu")
    namespace, local, remote = other_host

    def echo(node: NodeProcess) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", namespace, "echoscu", "-aet", "CT1",
                               "-aec", node.ae_title, local, str(node.port)],
                              env=dcmtk_env(), capture_output=True, text=True, timeout=60)

    default = make_node(extra_env={"PACSNODE__NODE__HOST": "0.0.0.0"})
    refused = echo(default)
    assert refused.returncode != 0, refused.stdout
    row = association(default, "CT1", remote)
    assert row["outcome"] == "rejected" and remote in row["reason"]
    assert "WARNING" in default.log() and "loopback addresses only" in default.log()

    listed = make_node(data_dir=default.data_dir.parent / "listed", extra_env={
        "PACSNODE__NODE__HOST": "0.0.0.0",
        "PACSNODE__SECURITY__ALLOWED_CALLING_AES": json.dumps([{"ae_title": "CT1",
                                                                  "host": remote}])})
    accepted = echo(listed)
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    assert association(listed, "CT1", remote)["outcome"] == "released"


def _wait_for_log(node: NodeProcess, text: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while text not in node.log():
        assert time.monotonic() < deadline, f"{text!r} not in the log:\n{node.log()[-2000:]}"
        time.sleep(0.1)


def test_sighup_reloads_the_list_and_a_bad_file_keeps_the_running_one(
        make_node: Any, tmp_path: Path) -> None:
    config = tmp_path / "pacsnode.yaml"
    config.write_text("security:\n  allowed_calling_aes:\n"
                      "    - {ae_title: OLDSCU, host: 127.0.0.1}\n")
    node = make_node(extra_env={"PACSNODE_CONFIG": str(config)})
    assert echo_from(node, "OLDSCU", "127.0.0.1")
    assert not echo_from(node, "NEWSCU", "127.0.0.1")

    config.write_text("security:\n  allowed_calling_aes:\n"
                      "    - {ae_title: NEWSCU, host: localhost}\n"
                      "study: {stable_age_s: 99}\n")
    assert node.proc is not None
    node.proc.send_signal(signal.SIGHUP)
    _wait_for_log(node, "reloaded: security: accepting associations from NEWSCU@localhost")
    assert echo_from(node, "NEWSCU", "127.0.0.1")  # localhost resolved on reload
    assert not echo_from(node, "OLDSCU", "127.0.0.1")
    # The environment's study.stable_age_s wins over the file in both, so only
    # changes the reload cannot apply are named (none here).
    assert "applied only at the next start" not in node.log()

    config.write_text("security:\n  allowed_calling_aes:\n    - {ae_title: NEWSCU}\n")
    node.proc.send_signal(signal.SIGHUP)
    _wait_for_log(node, "reload refused, the running configuration stays")
    assert "security.allowed_calling_aes.0.host" in node.log()
    assert echo_from(node, "NEWSCU", "127.0.0.1")

    config.write_text("security:\n  allowed_calling_aes:\n"
                      "    - {ae_title: NEWSCU, host: 127.0.0.1}\n"
                      "jobs: {workers: 3}\n")
    node.proc.send_signal(signal.SIGHUP)
    _wait_for_log(node, "changed, but applied only at the next start: jobs.workers")
