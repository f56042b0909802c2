"""A stuck job does not hold its series, or the node, forever (``jobs.timeout_s``).

A user's model that takes minutes per series (dozens of wide convolutions) stands in for
a model that hangs: its worker is killed at the timeout and replaced, the job is run
again and then failed with the reason, the node keeps receiving meanwhile, and the next
series is analysed by the new worker.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

from analysis.phantoms.dicom_series import write_ct_series
from analysis.phantoms.trunk import PhantomSpec, make_phantom
from tests.conftest import dcmtk_env, require_tool
from tests.test_models_cli import user_card
from tests.test_return_to_pacs import wait_until

TIMEOUT_S = 6


def slow_model(path: Path, size: int = 64, layers: int = 60) -> None:
    """A valid segmentation model (softmax over 2 classes) that is very slow on a CPU.

    About 0.6 s per 64x64 slice on 2 cores here, so 96 slices take ten times the
    timeout: the margin must hold on a quiet machine too (96 channels and 24 slices
    once finished in under 6 s).
    """
    import keras

    stack = [keras.Input((size, size, 1))]
    stack += [keras.layers.Conv2D(128, 3, padding="same", activation="relu")
              for _ in range(layers)]
    stack.append(keras.layers.Conv2D(2, 1, activation="softmax"))
    keras.Sequential(stack).save(path)


def test_a_job_over_its_timeout_is_killed_retried_and_failed(make_node: Any,
                                                             tmp_path: Path) -> None:
    require_tool("storescu", "echoscu")
    slow_model(tmp_path / "slow.keras")
    user_card(tmp_path / "slow.json")
    spec = PhantomSpec(slices=96, rows=64, columns=64, pixel_spacing_mm=6.0, seed=2)
    stuck = write_ct_series(make_phantom(spec), tmp_path / "stuck", series_number=1,
                            series_description="slow")
    quick = write_ct_series(make_phantom(spec), tmp_path / "quick", series_number=2,
                            study_instance_uid=stuck.study_instance_uid)
    node = make_node(stable_age_s=1.0, extra_env={
        "PACSNODE__MODELS": json.dumps([{"name": "slow", "path": str(tmp_path / "slow.keras"),
                                         "card": str(tmp_path / "slow.json")}]),
        "PACSNODE__ROUTES": json.dumps([
            {"name": "slow", "match": {"series_description": "slow"}, "pipeline": "cnn",
             "model": "slow"},
            {"name": "quick", "match": {"modality": "CT"}, "pipeline": "ct-body"}]),
        "PACSNODE__JOBS__TIMEOUT_S": str(TIMEOUT_S),
        "PACSNODE__JOBS__MAX_ATTEMPTS": "2",
    })
    node.storescu(*stuck.paths)
    node.storescu(*quick.paths)
    by_series: dict[str, Any] = {}

    def analysed() -> bool:
        detail = node.study(stuck.study_instance_uid)
        by_series.update({s["series_instance_uid"]: s["analysis"] for s in detail["series"]})
        return all(a and a["status"] in ("done", "failed") for a in by_series.values())

    started = time.monotonic()
    wait_until(lambda: _refresh(node, stuck, by_series), 120, "the slow job to start")
    # The node keeps serving while its worker is stuck.
    echo = subprocess.run(["echoscu", "-aec", node.ae_title, "127.0.0.1", str(node.port)],
                          env=dcmtk_env(), capture_output=True, text=True, timeout=30)
    assert echo.returncode == 0, echo.stderr
    wait_until(analysed, 240, f"both series to end\n{node.log()[-3000:]}")
    slow = by_series[stuck.series_instance_uid]
    assert slow["status"] == "failed" and slow["attempt"] == 2, slow["reason"]
    assert slow["reason"] == f"timed out after {TIMEOUT_S} s (2 attempts); giving up"
    # Each attempt was stopped at the timeout, not run to its end (minutes).
    assert time.monotonic() - started < 200
    assert by_series[quick.series_instance_uid]["status"] == "done", by_series[quick.series_instance_uid]["reason"]
    assert node.log().count("(jobs.timeout_s); stopping its worker") == 2


def _refresh(node: Any, series: Any, by_series: dict[str, Any]) -> bool:
    detail = node.study(series.study_instance_uid)
    by_series.update({s["series_instance_uid"]: s["analysis"] for s in detail["series"]})
    job = by_series.get(series.series_instance_uid) or {}
    return job.get("status") == "running"
