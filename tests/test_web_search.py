"""The studies search, through `pacsnode web` on a generated catalogue: every filter
finds what it should, and 100,000 studies answer a page in well under a second."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.catalogue import SENDERS, fill, study_row
from tests.conftest import PACSNODE, NodeProcess, free_port
from tests.web_helpers import add_user, cli, wait_web

BIG = 100_000


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NodeProcess, str]]:
    """`pacsnode web` alone on a database holding BIG studies, and a Bearer token."""
    folder = tmp_path_factory.mktemp("catalogue")
    node = NodeProcess(data_dir=folder / "var", port=free_port(),
                       db_url=f"sqlite:///{folder / 'var' / 'pacsnode.db'}")
    assert cli(node, "db", "upgrade").returncode == 0
    fill(node.db_url, BIG)
    add_user(node, "qa", "auditor")
    token = cli(node, "token", "create", "--user", "qa").stdout.strip()
    log = (folder / "web.log").open("wb")
    proc = subprocess.Popen([*PACSNODE, "web"], env=node.env, stdout=log, stderr=log)
    try:
        wait_web(node.web_url)
        yield node, token
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def _search(catalogue: tuple[NodeProcess, str], **params: Any) -> tuple[dict[str, Any], float]:
    node, token = catalogue
    started = time.perf_counter()
    answer = requests.get(f"{node.web_url}/api/studies", params=params, timeout=30,
                          headers={"Authorization": f"Bearer {token}"})
    elapsed = time.perf_counter() - started
    assert answer.status_code == 200, answer.text
    return answer.json(), elapsed


def _expected(predicate: Any) -> list[str]:
    """The UIDs the generator made that match, newest first."""
    return [f"1.2.826.0.1.3680043.10.1.{n}" for n in reversed(range(BIG))
            if predicate(study_row(n))]


def _uids(found: dict[str, Any]) -> list[str]:
    return [s["study_instance_uid"] for s in found["studies"]]


def test_each_filter(catalogue: tuple[NodeProcess, str]) -> None:
    found, _ = _search(catalogue, patient_id="P0012345")
    assert _uids(found) == _expected(lambda r: r["patient_id"] == "P0012345")
    assert found["total"] == 2 and found["studies"][0]["patient_id"] == "P0012345"
    found, _ = _search(catalogue, accession_number="A00054321")
    assert _uids(found) == _expected(lambda r: r["accession"] == "A00054321")
    found, _ = _search(catalogue, patient_name="name042^given1", page_size=1000)
    expected = _expected(lambda r: r["patient_name"].lower().startswith("name042^given1"))
    assert found["total"] == len(expected) and _uids(found) == expected[:1000]
    found, _ = _search(catalogue, date_from="2025-02-01", date_to="2025-02-02", page_size=1000)
    expected = _expected(lambda r: "20250201" <= r["study_date"] <= "20250202")
    assert found["total"] == len(expected) == 576 and _uids(found) == expected
    found, _ = _search(catalogue, status="stable", calling_ae="MR1", page=3, page_size=10)
    expected = _expected(lambda r: r["status"] == "stable" and SENDERS[r["sender"]] == "MR1")
    assert found["total"] == len(expected) and _uids(found) == expected[20:30]
    bad = requests.get(f"{catalogue[0].web_url}/api/studies", params={"date_from": "1 May"},
                       headers={"Authorization": f"Bearer {catalogue[1]}"}, timeout=10)
    assert bad.status_code == 422 and "YYYY-MM-DD" in bad.text


@pytest.mark.parametrize("params", [
    {}, {"page": 1500}, {"patient_name": "NAME5"}, {"status": "receiving"},
    {"calling_ae": "CT2"}, {"date_from": "2025-03-01", "date_to": "2025-06-30"},
    {"patient_id": "P0049999"}, {"accession_number": "A00099999"},
], ids=lambda p: ",".join(p) or "newest")
def test_a_page_of_100000_studies_in_well_under_a_second(
        catalogue: tuple[NodeProcess, str], params: dict[str, Any]) -> None:
    _search(catalogue, **params)  # warm the page cache once
    found, elapsed = _search(catalogue, **params)
    assert found["studies"], "the search found nothing to time"
    assert elapsed < 0.5, f"{params}: {elapsed:.3f} s for a page of {found['total']} matches"


def test_the_page_is_bookmarkable_html(catalogue: tuple[NodeProcess, str],
                                       tmp_path: Path) -> None:
    from tests.web_helpers import logged_in

    node, _ = catalogue
    session = logged_in(node.web_url, "qa")
    page = session.get(f"{node.web_url}/studies", params={"patient_id": "P0000007"},
                       timeout=30)
    assert page.status_code == 200 and "2 studies" in page.text
    assert page.text.count("/studies/1.2.826.0.1.3680043.10.1.") == 2
    assert "P0000007" in page.text and "NAME007^GIVEN7" in page.text
