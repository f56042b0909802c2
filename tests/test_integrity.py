"""The index under races and odd senders: the same instance on two associations at once,
a series that moves to another study, a study whose patient changes.

Real associations against a real node, on SQLite and PostgreSQL.
"""

from __future__ import annotations

import threading
from typing import Any

from pydicom.uid import generate_uid

from tests.conftest import NodeProcess, query
from tests.test_refusals import associate, association_rows, instance, store

CONFLICT = 0xC410


def test_a_series_in_another_study_is_refused_and_counted(node: NodeProcess) -> None:
    series = generate_uid()
    first, second = generate_uid(), generate_uid()
    assoc = associate(node, "MOVER")
    try:
        assert store(assoc, instance(first, series))[0] == 0
        status, comment = store(assoc, instance(second, series))
    finally:
        assoc.release()
    assert status == CONFLICT
    assert comment.startswith("SeriesInstanceUID") and "another study" in comment
    assert [s["study_instance_uid"] for s in node.studies()] == [first]
    row = association_rows(node)["MOVER"]
    assert (row["instances_stored"], row["instances_failed"]) == (1, 1)
    assert any("0xC410" in line and "another study" in line
               for line in node.log().splitlines())


def test_a_study_whose_patient_changes_is_refused(node: NodeProcess) -> None:
    study, series = generate_uid(), generate_uid()
    assoc = associate(node, "RELABEL")
    try:
        assert store(assoc, instance(study, series, PatientID="A-1"))[0] == 0
        status, comment = store(assoc, instance(study, generate_uid(), PatientID="B-2"))
        # The same patient again (another series) is fine.
        again = store(assoc, instance(study, generate_uid(), PatientID="A-1"))[0]
    finally:
        assoc.release()
    assert status == CONFLICT and "PatientID" in comment
    assert "A-1" not in comment and "B-2" not in comment  # no patient data echoed
    assert again == 0
    assert "B-2" not in node.log()
    (only,) = node.studies()
    assert only["instances"] == 2


def test_the_same_instance_on_two_associations_at_once(node: NodeProcess) -> None:
    """One row, one file, both answered Success, every time."""
    study, series = generate_uid(), generate_uid()
    first = associate(node, "TWIN1")
    second = associate(node, "TWIN2")
    try:
        assert store(first, instance(study, series))[0] == 0  # the series is known now
        for _ in range(30):
            sop = generate_uid()
            statuses: list[int] = []
            start = threading.Barrier(2)

            def send(assoc: Any, sop: str = sop) -> None:
                start.wait()
                statuses.append(store(assoc, instance(study, series, sop))[0])

            threads = [threading.Thread(target=send, args=(a,)) for a in (first, second)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            assert statuses == [0, 0]
            rows = query(node.db_url, "SELECT file_path FROM instances "
                         "WHERE sop_instance_uid = :sop", sop=sop)
            assert len(rows) == 1
            assert (node.data_dir / rows[0]["file_path"]).is_file()
    finally:
        first.release()
        second.release()
    assert node.studies()[0]["instances"] == 31
