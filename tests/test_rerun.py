"""``pacsnode rerun``: an operator analyses a study again; new results, the old kept."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from analysis.phantoms.dicom_series import write_ct_series
from analysis.phantoms.trunk import PhantomSpec, make_phantom
from tests.conftest import query, require_tool
from tests.test_return_to_pacs import analysing_node, wait_until

SMALL = PhantomSpec(slices=12, rows=96, columns=96, pixel_spacing_mm=4.0, seed=5)


def test_rerun_queues_new_jobs_and_keeps_the_old_results(make_node: Any,
                                                         tmp_path: Path) -> None:
    require_tool("storescu")
    ct = write_ct_series(make_phantom(SMALL), tmp_path / "ct")
    node = analysing_node(make_node)
    node.storescu(*ct.paths)
    study = ct.study_instance_uid
    wait_until(lambda: node.study(study)["status"] == "analyzed", 120, "the first analysis")

    refused = node.cli("rerun", "--study", "1.2.3.4", check=False)
    assert refused.returncode != 0 and "no study 1.2.3.4" in refused.stderr
    refused = node.cli("rerun", "--study", study, "--series", "1.2.3.4", check=False)
    assert refused.returncode != 0 and "has no series 1.2.3.4" in refused.stderr

    done = node.cli("rerun", "--study", study, "--series", ct.series_instance_uid)
    assert "1 job(s) queued" in done.stdout
    wait_until(lambda: node.study(study)["status"] == "analyzed"
               and len(query(node.db_url, "SELECT id FROM jobs WHERE status = 'done'")) == 2,
               120, f"the rerun\n{node.log()[-2000:]}")
    jobs = query(node.db_url, "SELECT id FROM jobs ORDER BY id")
    segs = query(node.db_url, "SELECT job_fk, sop_instance_uid FROM results WHERE kind = 'seg'")
    assert sorted(s["job_fk"] for s in segs) == [j["id"] for j in jobs]
    assert len({s["sop_instance_uid"] for s in segs}) == 2  # new objects, old ones kept
    history = [e["reason"] for e in node.study(study)["events"]]
    assert any(r.startswith("rerun requested") for r in history), history
