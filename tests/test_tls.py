"""DICOM TLS both ways, through real processes: DCMTK and pacsnode's own client against
the node's TLS listener, and deliveries to an Orthanc that speaks DICOM TLS only.

Certificates are made by the scripts the README gives (deploy/tls), with openssl.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import NodeProcess, dcmtk_env, query, require_tool, wait_for_port
from tests.orthanc import Orthanc, free_ports
from tests.test_return_to_pacs import DEFAULT_ROUTES, SPEC, wait_until

SCRIPTS = Path(__file__).resolve().parents[1] / "deploy" / "tls"


@dataclass(frozen=True)
class PKI:
    """A test CA with certificates for the node, a client and a PACS, plus a second CA
    the node does not trust, with a client certificate of its own."""

    folder: Path
    rogue: Path

    def pem(self, name: str) -> str:
        return str(self.folder / f"{name}.pem")

    def key(self, name: str) -> str:
        return str(self.folder / f"{name}.key")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    require_tool("openssl")
    folder = tmp_path_factory.mktemp("pki")
    rogue = tmp_path_factory.mktemp("rogue-pki")

    def run(*args: str) -> None:
        subprocess.run([str(SCRIPTS / args[0]), *args[1:]], check=True, capture_output=True)

    run("make-ca.sh", str(folder))
    run("make-cert.sh", str(folder), "node")
    run("make-cert.sh", str(folder), "client")
    run("make-cert.sh", str(folder), "pacs")
    run("make-cert.sh", str(folder), "elsewhere", "DNS:pacs.elsewhere.example")
    run("make-ca.sh", str(rogue), "rogue CA")
    run("make-cert.sh", str(rogue), "client")
    return PKI(folder, rogue)


def tls_node(make_node: Any, pki: PKI, certificate: str = "node", **env: str) -> NodeProcess:
    port = free_ports(1)[0]
    node = make_node(extra_env={
        "PACSNODE__NODE__TLS__PORT": str(port),
        "PACSNODE__NODE__TLS__CERTIFICATE": pki.pem(certificate),
        "PACSNODE__NODE__TLS__PRIVATE_KEY": pki.key(certificate),
        "PACSNODE__NODE__TLS__CA_CERTIFICATES": pki.pem("ca"),
        **env,
    })
    wait_for_port(port, node.proc)
    node.tls_port = port  # type: ignore[attr-defined]
    return node


def storescu_tls(node: NodeProcess, key: str, certificate: str, ca: str,
                 *paths: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["storescu", "-v", "+tls", key, certificate, "+cf", ca, "-aet", "STORESCU",
         "-aec", node.ae_title, "127.0.0.1", str(node.tls_port), *map(str, paths)],  # type: ignore[attr-defined]
        env=dcmtk_env(), capture_output=True, text=True, timeout=120)


def associations(node: NodeProcess) -> list[dict[str, Any]]:
    return query(node.db_url, "SELECT calling_ae, outcome, reason, tls, peer_certificate, "
                 "instances_stored FROM associations ORDER BY id")


def test_dcmtk_stores_over_tls_and_the_association_says_so(
        make_node: Any, pki: PKI, ct_series: Any) -> None:
    require_tool("storescu")
    node = tls_node(make_node, pki)
    result = storescu_tls(node, pki.key("client"), pki.pem("client"), pki.pem("ca"),
                          *ct_series.paths)
    assert result.returncode == 0, result.stdout + result.stderr
    (study,) = node.studies()
    assert study["instances"] == len(ct_series.paths)
    for path, uid in zip(ct_series.paths, ct_series.sop_instance_uids):
        stored = node.data_dir / "studies" / ct_series.study_instance_uid / \
            ct_series.series_instance_uid / f"{uid}.dcm"
        # byte-exact after the File Meta group, as on the plain listener
        assert stored.read_bytes()[-1000:] == path.read_bytes()[-1000:]
    (row,) = associations(node)
    assert row["outcome"] == "released" and bool(row["tls"])
    assert "CN=client" in row["peer_certificate"]
    assert row["instances_stored"] == len(ct_series.paths)
    (sender,) = node.study(ct_series.study_instance_uid)["associations"]
    assert sender["tls"] is True and "CN=client" in sender["peer_certificate"]
    # the plain listener keeps serving, and records no TLS
    node.storescu(ct_series.paths[0])
    assert [bool(r["tls"]) for r in associations(node)] == [True, False]


def test_client_certificate_of_another_ca_is_refused_at_the_handshake(
        make_node: Any, pki: PKI, ct_series: Any) -> None:
    require_tool("storescu")
    node = tls_node(make_node, pki)
    rogue = pki.rogue
    result = storescu_tls(node, str(rogue / "client.key"), str(rogue / "client.pem"),
                          pki.pem("ca"), ct_series.paths[0])
    assert result.returncode != 0
    assert node.studies() == []
    (row,) = associations(node)
    assert row["outcome"] == "rejected" and bool(row["tls"])
    assert row["reason"].startswith("TLS handshake failed: client certificate")
    assert "refused connection from 127.0.0.1" in node.log()


def test_a_client_without_a_certificate_is_refused(make_node: Any, pki: PKI,
                                                   ct_series: Any) -> None:
    require_tool("storescu")
    node = tls_node(make_node, pki)
    result = subprocess.run(
        ["storescu", "+tla", "+cf", pki.pem("ca"), "-aec", node.ae_title, "127.0.0.1",
         str(node.tls_port), str(ct_series.paths[0])],  # type: ignore[attr-defined]
        env=dcmtk_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert node.studies() == []
    (row,) = associations(node)
    assert row["outcome"] == "rejected"
    assert "sent no certificate" in row["reason"]


def test_plain_tcp_on_the_tls_port_gets_no_association(make_node: Any, pki: PKI) -> None:
    require_tool("echoscu")
    node = tls_node(make_node, pki)
    result = subprocess.run(["echoscu", "-aec", node.ae_title, "127.0.0.1",
                             str(node.tls_port)],  # type: ignore[attr-defined]
                            env=dcmtk_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    rows = associations(node)
    assert [(r["calling_ae"], r["outcome"]) for r in rows] == [("", "rejected")]
    assert "not TLS" in rows[0]["reason"]


def test_a_silent_connection_does_not_hold_the_tls_listener(make_node: Any, pki: PKI) -> None:
    """The handshake runs in the connection's thread: one peer that never says hello
    does not stall everyone else's."""
    node = tls_node(make_node, pki, PACSNODE__NODE__ASSOCIATION_TIMEOUT_S="2")
    with socket.create_connection(("127.0.0.1", node.tls_port)):  # type: ignore[attr-defined]
        echo = node.cli("echo", "--tls-ca", pki.pem("ca"), "--tls-cert", pki.pem("client"),
                        "--tls-key", pki.key("client"))
        assert "status 0x0000" in echo.stdout
        time.sleep(3)
    assert "no handshake within node.association_timeout_s" in associations(node)[-1]["reason"]


def test_pacsnode_echo_and_send_over_tls(make_node: Any, pki: PKI, ct_series: Any) -> None:
    node = tls_node(make_node, pki)
    client = ["--tls-ca", pki.pem("ca"), "--tls-cert", pki.pem("client"),
              "--tls-key", pki.key("client")]
    # no --port: with --tls-ca the default is node.tls.port
    echo = node.cli("echo", *client)
    assert f":{node.tls_port}: status 0x0000" in echo.stdout  # type: ignore[attr-defined]
    sent = node.cli("send", "--quiet", "--json", *client, *map(str, ct_series.paths))
    assert json.loads(sent.stdout)["sent"] == len(ct_series.paths)
    assert node.studies()[0]["instances"] == len(ct_series.paths)
    # Without our certificate the node refuses us, and the CLI says what to check.
    refused = node.cli("echo", "--tls-ca", pki.pem("ca"), check=False)
    assert refused.returncode != 0 and "client certificate" in refused.stderr
    # Option mistakes are named before anything is sent.
    lone = node.cli("echo", "--tls-cert", pki.pem("client"), check=False)
    assert lone.returncode != 0 and "need --tls-ca" in lone.stderr
    missing = node.cli("echo", "--tls-ca", str(pki.folder / "nope.pem"), check=False)
    assert missing.returncode != 0 and "--tls-ca" in missing.stderr and "nope.pem" in missing.stderr


def test_a_peer_certificate_for_another_name_is_refused(make_node: Any, pki: PKI) -> None:
    """We verify the peer's certificate: the node shows one issued to
    pacs.elsewhere.example, and 127.0.0.1 is not in its subjectAltName."""
    node = tls_node(make_node, pki, certificate="elsewhere")
    result = node.cli("echo", "--tls-ca", pki.pem("ca"), "--tls-cert", pki.pem("client"),
                      "--tls-key", pki.key("client"), check=False)
    assert result.returncode != 0
    assert "TLS handshake with" in result.stderr and "mismatch" in result.stderr


def test_tls_files_that_do_not_load_stop_the_start_naming_the_key(
        make_node: Any, pki: PKI, tmp_path: Path) -> None:
    bad_key = tmp_path / "bad.key"
    bad_key.write_text("not a key\n")
    with pytest.raises(RuntimeError) as failed:
        tls_node(make_node, pki, PACSNODE__NODE__TLS__PRIVATE_KEY=str(bad_key))
    assert "node.tls.certificate/node.tls.private_key: cannot load" in str(failed.value)
    with pytest.raises(RuntimeError) as failed:
        make_node(extra_env={"PACSNODE__DESTINATIONS": json.dumps([{
            "name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104,
            "tls": {"ca_certificates": str(tmp_path / "absent.pem")}}])})
    assert "destinations.0.tls.ca_certificates" in str(failed.value)


# -- to a PACS that speaks DICOM TLS only ----------------------------------------------


@pytest.fixture
def tls_orthanc(tmp_path: Path, pki: PKI) -> Any:
    require_tool("Orthanc")
    # Orthanc reads its files as the test's user; copies keep the fixture's folder intact.
    folder = tmp_path / "orthanc"
    folder.mkdir()
    for name in ("pacs.pem", "pacs.key", "ca.pem"):
        shutil.copy(pki.folder / name, folder / name)
    server = Orthanc.start(folder, extra_config={
        "DicomTlsEnabled": True,
        "DicomTlsCertificate": str(folder / "pacs.pem"),
        "DicomTlsPrivateKey": str(folder / "pacs.key"),
        "DicomTlsTrustedCertificates": str(folder / "ca.pem"),
        "DicomTlsRemoteCertificateRequired": True,
    })
    yield server
    server.stop()


def test_results_reach_a_tls_only_orthanc(make_node: Any, pki: PKI, tls_orthanc: Orthanc,
                                          tmp_path: Path) -> None:
    require_tool("storescu", "echoscu")
    from analysis.phantoms.dicom_series import write_ct_series
    from analysis.phantoms.trunk import make_phantom

    # Orthanc's DICOM port speaks TLS only: a plain C-ECHO is not answered.
    plain = subprocess.run(["echoscu", "-aec", "ORTHANC", "127.0.0.1",
                            str(tls_orthanc.dicom_port)],
                           env=dcmtk_env(), capture_output=True, text=True, timeout=60)
    assert plain.returncode != 0
    node = make_node(stable_age_s=1.0, extra_env={
        "PACSNODE__ROUTES": DEFAULT_ROUTES,
        "PACSNODE__DESTINATIONS": json.dumps([{
            "name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1",
            "port": tls_orthanc.dicom_port,
            "tls": {"ca_certificates": pki.pem("ca"), "certificate": pki.pem("node"),
                    "private_key": pki.key("node")}}]),
        "PACSNODE__DELIVERY__RETRY_INITIAL_S": "0.5",
    })
    ct = write_ct_series(make_phantom(SPEC), tmp_path / "ct")
    node.storescu(*ct.paths)
    counts = wait_until(
        lambda: (c := tls_orthanc.modalities_of_study(ct.study_instance_uid)).get("SR") and c,
        timeout=180, what=f"the SEG and SR in Orthanc\n{node.log()[-3000:]}")
    assert counts == {"SEG": 1, "SR": 1}
    detail = node.study(ct.study_instance_uid)
    results = detail["series"][0]["analysis"]["results"]
    assert sorted((r["kind"], d["status"]) for r in results for d in r["deliveries"]) == [
        ("seg", "sent"), ("sr", "sent")]


def test_python_refuses_tls_older_than_1_2(make_node: Any, pki: PKI) -> None:
    """BCP 195: TLS 1.0 and 1.1 are refused by the listener (if this OpenSSL can still
    offer them at all)."""
    node = tls_node(make_node, pki)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(pki.pem("ca"))
    context.load_cert_chain(pki.pem("client"), pki.key("client"))
    try:
        context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1_1
        context.set_ciphers("ALL:@SECLEVEL=0")
    except (ValueError, ssl.SSLError):
        pytest.skip("this OpenSSL cannot offer TLS 1.1 at all")
    with socket.create_connection(("127.0.0.1", node.tls_port)) as sock:  # type: ignore[attr-defined]
        with pytest.raises((ssl.SSLError, ConnectionError)):
            with context.wrap_socket(sock, server_hostname="127.0.0.1"):
                pass


def test_sighup_reads_the_tls_certificates_again(make_node: Any, pki: PKI,
                                                 tmp_path: Path) -> None:
    """Certificate rotation without a restart: new connections get the new files."""
    served = tmp_path / "served"
    served.mkdir()
    for suffix in ("pem", "key"):
        shutil.copy(pki.folder / f"node.{suffix}", served / f"node.{suffix}")
    node = tls_node(make_node, pki, PACSNODE__NODE__TLS__CERTIFICATE=str(served / "node.pem"),
                    PACSNODE__NODE__TLS__PRIVATE_KEY=str(served / "node.key"))
    client = ["--tls-ca", pki.pem("ca"), "--tls-cert", pki.pem("client"),
              "--tls-key", pki.key("client")]
    assert node.cli("echo", *client).returncode == 0
    for suffix in ("pem", "key"):  # now issued to another name: we must notice
        shutil.copy(pki.folder / f"elsewhere.{suffix}", served / f"node.{suffix}")
    assert node.proc is not None
    node.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "TLS certificates read again" not in node.log():
        assert time.monotonic() < deadline, node.log()[-2000:]
        time.sleep(0.1)
    refused = node.cli("echo", *client, check=False)
    assert refused.returncode != 0 and "mismatch" in refused.stderr


def test_tls_only_has_no_plain_listener(make_node: Any, pki: PKI, tmp_path: Path) -> None:
    port = free_ports(1)[0]
    node = make_node(port=port, extra_env={
        "PACSNODE__NODE__PLAIN_LISTENER": "false",
        "PACSNODE__NODE__TLS__PORT": str(port),
        "PACSNODE__NODE__TLS__CERTIFICATE": pki.pem("node"),
        "PACSNODE__NODE__TLS__PRIVATE_KEY": pki.key("node"),
        "PACSNODE__NODE__TLS__CA_CERTIFICATES": pki.pem("ca"),
    })
    assert "with DICOM TLS" in node.log() and f"127.0.0.1:{port}\n" not in node.log()
    echo = node.cli("echo", "--port", str(port), "--tls-ca", pki.pem("ca"),
                    "--tls-cert", pki.pem("client"), "--tls-key", pki.key("client"))
    assert "status 0x0000" in echo.stdout
    plain = node.cli("echo", "--port", str(port), check=False)
    assert plain.returncode != 0
