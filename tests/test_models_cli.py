"""The models through the command line: a user's own model in a route, routing by the
predicted region, the CNN-vs-classical QA figure, ``train`` and ``evaluate``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import yaml

from analysis import cnn
from analysis.model_card import ModelCard
from analysis.phantoms.dicom_series import write_ct_series
from analysis.phantoms.regions import make_region_phantom
from node.results import AlgorithmInfo, EncoderIdentity, build_segmentation
from tests.conftest import require_tool, save_instance

ANATOMY = {"value": "91723000", "scheme": "SCT", "meaning": "Anatomical Structure"}


def pacsnode(*args: str, config: Path | None = None) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "node.cli", *args]
    if config is not None:
        argv += ["--config", str(config)]
    return subprocess.run(argv, env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
                          timeout=600)


def write_config(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def region_series(folder: Path, region: str, seed: int, **kwargs: Any) -> Any:
    """A generated phantom of ``region`` written as a DICOM series."""
    phantom = make_region_phantom(region, seed, max_slices=24,
                                  matrix=kwargs.pop("matrix", 256))
    return write_ct_series(phantom, folder, series_description=f"{region} phantom",
                           body_part=kwargs.pop("body_part", region.upper()), **kwargs)


def user_model(path: Path, size: int = 64) -> None:
    """Two classes: 'liver' wherever the windowed input is above the middle (soft tissue)."""
    import keras

    model = keras.Sequential([keras.Input((size, size, 1)),
                              keras.layers.Conv2D(2, 1, activation="softmax")])
    kernel = np.zeros((1, 1, 1, 2), np.float32)
    kernel[..., 1] = 40.0
    model.layers[-1].set_weights([kernel, np.array([0.0, -20.0], np.float32)])
    model.save(path)


def user_card(path: Path, size: int = 64, classes: int = 2) -> None:
    card = ModelCard.load(cnn.SHIPPED_CARD).to_dict()
    card.update(input_shape=[None, size, size, 1], output_shape=[None, size, size, classes],
                model_sha256=None, name="user-liver")
    card.pop("postprocessing", None)  # the shipped card's steps name its own labels
    card["labels"] = [
        {"index": 0, "label": "background", "display": "Background"},
        {"index": 1, "label": "liver", "display": "Liver", "category": ANATOMY,
         "type": {"value": "10200004", "scheme": "SCT", "meaning": "Liver"}},
    ]
    path.write_text(json.dumps(card))


def test_a_users_model_in_a_route(tmp_path: Path) -> None:
    require_tool("dciodvfy")
    user_model(tmp_path / "liver.keras")
    user_card(tmp_path / "liver.json")
    config = write_config(tmp_path / "node.yaml", {
        "models": [{"name": "mine", "path": str(tmp_path / "liver.keras"),
                    "card": str(tmp_path / "liver.json")}],
        "routes": [{"name": "liver", "match": {"modality": "CT"}, "pipeline": "cnn",
                    "model": "mine"}],
    })
    series = region_series(tmp_path / "in", "abdomen", 900_001)
    result = pacsnode("analyze", str(tmp_path / "in"), "--out", str(tmp_path / "out"),
                      config=config)
    assert result.returncode == 0, result.stderr
    (item,) = json.loads(result.stdout)["series"]
    assert item["pipeline"] == "cnn" and [s["label"] for s in item["segments"]] == ["liver"]
    seg = hd.seg.segread(item["outputs"]["seg"])
    (segment,) = seg.SegmentSequence
    assert segment.SegmentLabel == "Liver"
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "10200004"
    assert seg.StudyInstanceUID == series.study_instance_uid
    check = subprocess.run(["dciodvfy", item["outputs"]["seg"]], capture_output=True, text=True)
    assert not [line for line in check.stderr.splitlines() if line.startswith("Error")]


def test_a_model_that_does_not_match_its_card_is_refused_at_start(tmp_path: Path) -> None:
    user_model(tmp_path / "liver.keras")
    user_card(tmp_path / "liver.json", classes=3)  # the card promises 3 outputs
    card = json.loads((tmp_path / "liver.json").read_text())
    card["labels"].append({"index": 2, "label": "spleen", "display": "Spleen",
                           "category": ANATOMY,
                           "type": {"value": "78961009", "scheme": "SCT", "meaning": "Spleen"}})
    (tmp_path / "liver.json").write_text(json.dumps(card))
    config = write_config(tmp_path / "node.yaml", {
        "models": [{"name": "bad", "path": str(tmp_path / "liver.keras"),
                    "card": str(tmp_path / "liver.json")}],
        "routes": [{"name": "r", "pipeline": "cnn", "model": "bad"}],
        "storage": {"data_dir": str(tmp_path / "var")},
    })
    for command in (["serve"], ["analyze", str(tmp_path), "--out", str(tmp_path / "o")]):
        result = pacsnode(*command, config=config)
        assert result.returncode == 2, result.stderr
        assert "models.0 (bad)" in result.stderr
        assert "2 output channels" in result.stderr and "maps 3 labels" in result.stderr
        assert "Traceback" not in result.stderr


def test_routing_by_predicted_region_and_the_qa_figures(tmp_path: Path) -> None:
    config = write_config(tmp_path / "node.yaml", {
        "routes": [{"name": "chest-only", "match": {"modality": "CT", "predicted_region": "chest"},
                    "pipeline": "ct-body-lungs"}],
    })
    chest = region_series(tmp_path / "in" / "chest", "chest", 900_002)
    # An abdomen whose header claims CHEST: skipped by the route, and flagged.
    belly = region_series(tmp_path / "in" / "belly", "abdomen", 900_003, body_part="CHEST")
    result = pacsnode("analyze", str(tmp_path / "in"), "--out", str(tmp_path / "out"),
                      config=config)
    assert result.returncode == 0, result.stderr
    series = {s["series_instance_uid"]: s for s in json.loads(result.stdout)["series"]}
    done = series[chest.series_instance_uid]
    assert done["status"] == "done" and done["predicted_region"]["label"] == "chest"
    assert 0.5 < done["predicted_region"]["probability"] <= 1.0
    lungs = {s["label"]: s for s in done["segments"] if s["label"].startswith("lung")}
    assert set(lungs) == {"lung_left", "lung_right"}
    for segment in lungs.values():
        assert 0.8 < segment["dice_vs_classical"] <= 1.0 and segment["mask_from"] == "cnn"
    skipped = series[belly.series_instance_uid]
    assert skipped["status"] == "skipped"
    assert "predicted region abdomen" in skipped["reason"]
    assert skipped["predicted_region"]["label"] == "abdomen"

    # The SR carries the region and the agreement.
    sr = hd.sr.srread(done["outputs"]["sr"])
    found = hd.sr.utils.find_content_items(
        sr, name=hd.sr.CodedConcept("123014", "DCM", "Target Region"), recursive=True)
    assert [item.ConceptCodeSequence[0].CodeMeaning for item in found] == ["Chest"]


def test_body_part_contradiction_is_flagged(tmp_path: Path) -> None:
    belly = region_series(tmp_path / "in", "abdomen", 900_004, body_part="HEAD")
    result = pacsnode("analyze", str(tmp_path / "in"), "--out", str(tmp_path / "out"))
    (item,) = json.loads(result.stdout)["series"]
    assert item["series_instance_uid"] == belly.series_instance_uid
    assert item["predicted_region"]["label"] == "abdomen"
    assert item["body_part_flag"] and "HEAD" in item["body_part_flag"]


def test_evaluate_against_a_reference_seg_and_region_labels(tmp_path: Path) -> None:
    phantom = make_region_phantom("chest", 900_005, max_slices=24, matrix=256)
    series = write_ct_series(phantom, tmp_path / "data" / "ct")
    sources = sorted((pydicom.dcmread(p) for p in series.paths),
                     key=lambda ds: int(ds.InstanceNumber))
    masks = {"lung_left": phantom.labels == 2, "lung_right": phantom.labels == 3}
    seg = build_segmentation(sources, masks, algorithm=AlgorithmInfo("reference", "1"),
                             identity=EncoderIdentity.for_node("REF"), series_number=50,
                             series_description="reference")
    save_instance(seg, tmp_path / "data" / "reference-seg.dcm")
    result = pacsnode("evaluate", str(tmp_path / "data"), "--region",
                      f"chest={tmp_path / 'data'}", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    (item,) = report["series"]
    for label in ("lung_left", "lung_right"):
        assert set(item["dice"][label]) == {"final", "cnn", "classical"}
        assert item["dice"][label]["final"] > 0.85, item
    assert report["summary"]["region"] == {"accuracy": 1.0, "correct": 1, "n": 1,
                                           "confusion": {"chest": {"chest": 1}}}
    text = pacsnode("evaluate", str(tmp_path / "data"))
    assert "lung_left" in text.stdout and "Dice" in text.stdout


def test_evaluate_synthetic_and_train_smoke(tmp_path: Path) -> None:
    result = pacsnode("evaluate", "--synthetic", "1", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)["summary"]
    assert summary["region"]["n"] == 4
    assert {"body", "lung_left", "lung_right"} <= set(summary["dice"])
    region = pacsnode("train", "--task", "region", "--out", str(tmp_path / "region"),
                      "--per-region", "6")
    assert region.returncode == 0, region.stderr
    assert (tmp_path / "region" / "model.joblib").is_file()
    bad = pacsnode("train", "--task", "region", "--real", str(tmp_path), "--out",
                   str(tmp_path / "x"))
    assert bad.returncode == 2 and "REGION=FOLDER" in bad.stderr


def test_evaluate_synthetic_scores_the_model_it_is_given(tmp_path: Path) -> None:
    """``--synthetic`` with ``--model``: the configured model's masks are scored, not the
    shipped U-Net's. This one calls every pixel body, so its lungs score 0 where there is
    lung (the shipped U-Net's score above 0.9 there)."""
    import keras

    model = keras.Sequential([keras.Input((64, 64, 1)), keras.layers.Conv2D(4, 1, activation="softmax")])
    model.layers[-1].set_weights([np.zeros((1, 1, 1, 4), np.float32),
                                  np.array([0.0, 20.0, 0.0, 0.0], np.float32)])
    model.save(tmp_path / "body.keras")
    card = ModelCard.load(cnn.SHIPPED_CARD).to_dict()
    card.update(input_shape=[None, 64, 64, 1], output_shape=[None, 64, 64, 4],
                model_sha256=None, name="all-body", model_file="body.keras")
    (tmp_path / "body.json").write_text(json.dumps(card))
    config = write_config(tmp_path / "node.yaml", {"models": [
        {"name": "all-body", "path": str(tmp_path / "body.keras"), "card": str(tmp_path / "body.json")}]})
    result = pacsnode("evaluate", "--synthetic", "1", "--model", "all-body", "--json", config=config)
    assert result.returncode == 0, result.stderr
    chest = next(s for s in json.loads(result.stdout)["series"] if s["series"].startswith("chest"))
    assert chest["dice"]["lung_left"]["cnn"] == 0.0, chest["dice"]
    assert chest["dice"]["body"]["cnn"] > 0.5, chest["dice"]
    refused = pacsnode("evaluate", "--synthetic", "1", "--model", "mine")
    assert refused.returncode != 0
    assert "--model 'mine': not in the configuration's models" in refused.stderr
