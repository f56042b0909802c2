"""The CNN segmentation model: model cards, loading and refusals, inference, training, the shipped model."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from analysis import cnn
from analysis.cnn import ModelLoadError, SegmentationModel, cnn_masks
from analysis.model_card import Code, ModelCard, ModelCardError, OutputLabel
from analysis.phantoms.trunk import (
    LABEL_LUNG_LEFT,
    LABEL_LUNG_RIGHT,
    PhantomSpec,
    make_phantom,
    phantom_affine,
)
from analysis.slice_grid import NotAxialError
from analysis.training.lungs import train_lungs
from analysis.types import BODY, LUNG_LEFT, LUNG_RIGHT, ImageVolume

ROOT = Path(__file__).resolve().parents[1]
# Keras calls np.array() on tensors in a way numpy 2 deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
TINY = dict(volumes=3, epochs=1, slice_size=64, slices_per_volume=4, eval_volumes=2, verbose=0)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum() + b.sum())
    return 2.0 * int((a & b).sum()) / total if total else 1.0


def phantom_volume(spec: PhantomSpec, *, flip_columns: bool = False) -> tuple[ImageVolume, np.ndarray]:
    phantom = make_phantom(spec)
    hu, labels = phantom.hu, phantom.labels
    if flip_columns:
        hu, labels = hu[:, :, ::-1].copy(), labels[:, :, ::-1].copy()
    spacing = (spec.slice_thickness_mm, spec.pixel_spacing_mm, spec.pixel_spacing_mm)
    return ImageVolume(hu=hu, spacing_mm=spacing, affine=phantom_affine(spec, flip_columns=flip_columns)), labels


def lung_card_dict(size: int = 64) -> dict:
    """A valid card for a 4-class body-and-lungs model of ``size`` input."""
    card = ModelCard.load(cnn.SHIPPED_CARD).to_dict()
    card.update(input_shape=[None, size, size, 1], output_shape=[None, size, size, 4], model_sha256=None)
    card["preprocessing"]["pixel_spacing_mm"] = 512.0 / size  # the same field of view
    return card


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, ModelCard]:
    out = tmp_path_factory.mktemp("tiny")
    return out, train_lungs(out, **TINY)


@pytest.fixture(scope="module")
def shipped() -> SegmentationModel:
    return SegmentationModel.shipped()


# ---------------------------------------------------------------------- cards


def test_shipped_card_validates_with_snomed_codes_and_metrics():
    card = ModelCard.load(cnn.SHIPPED_CARD)
    assert [(e.index, e.label) for e in card.labels] == [
        (0, "background"), (1, BODY), (2, LUNG_LEFT), (3, LUNG_RIGHT)]
    by_label = {e.label: e for e in card.labels}
    assert (by_label[BODY].type.value, by_label[BODY].type.scheme) == ("38266002", "SCT")
    assert by_label[LUNG_LEFT].type == Code("44029006", "SCT", "Left lung")
    assert by_label[LUNG_RIGHT].type == Code("3341006", "SCT", "Right lung")
    assert all(e.category == Code("91723000", "SCT", "Anatomical Structure") for e in card.segments)
    assert card.indices_of(BODY) == (1, 2, 3)
    assert card.input_shape == (None, 256, 256, 1) and card.output_shape == (None, 256, 256, 4)
    assert card.model_sha256 == cnn.file_sha256(cnn.SHIPPED_MODEL)
    for label in (BODY, LUNG_LEFT, LUNG_RIGHT):
        assert card.metrics["dice"][label] > 0.9
    assert card.training["synthetic"]["volumes"] > 0 and card.framework["tensorflow"]
    assert ModelCard.from_dict(json.loads(json.dumps(card.to_dict()))) == card


def test_shipped_card_names_the_real_data_that_trained_it():
    """The shipped U-Net trains on the real series with lung; the series without lung
    (limb crops, head phantom) stay out, so they can measure its false lung."""
    real = ModelCard.load(cnn.SHIPPED_CARD).training["real"]
    assert real["folders"] == ["../shared/data/ct-chest-lidc", "../shared/data/ct-chest-slice",
                               "../shared/data/ct-liver-3slice"]
    assert real["labels"].startswith("reference procedure")
    assert {s["corrections"] for s in real["series"]} == {
        "analysis/reference_corrections/lidc-idri-0314.json",
        "analysis/reference_corrections/ct1.json",
        "analysis/reference_corrections/ct-liver-3slice.json"}
    assert sum(s["slices"] for s in real["series"]) == real["slices"] == 279
    assert "--real ../shared/data/ct-chest-lidc" in ModelCard.load(cnn.SHIPPED_CARD).training["command"]


@pytest.mark.parametrize(
    ("mutate", "field", "words"),
    [
        (lambda c: c["labels"][2]["type"].update(meaning="x" * 65), "labels[2].type.meaning", "64"),
        (lambda c: c["labels"][3]["type"].update(scheme=""), "labels[3].type.scheme", "non-empty"),
        (lambda c: c["labels"][1].pop("category"), "labels[1].category", "required"),
        (lambda c: c["labels"][1].update(contains=["liver"]), "labels[1].contains", "'liver'"),
        (lambda c: c["labels"][2].update(index=7), "labels", "indices"),
        (lambda c: c["labels"][3].update(label="lung_left"), "labels[3].label", "twice"),
        (lambda c: c["labels"][2].update(label="Left Lung"), "labels[2].label", "lower case"),
        (lambda c: c["preprocessing"].update(pixel_spacing_mm=-1), "preprocessing.pixel_spacing_mm", "positive"),
        (lambda c: c["preprocessing"].update(hu_window=[600, -1000]), "preprocessing.hu_window", "below"),
        (lambda c: c["preprocessing"].update(orientation="as-stored"), "preprocessing.orientation", "standard-axial"),
        (lambda c: c.update(output_shape=[None, 64, 64, 5]), "output_shape", "5 channels"),
        (lambda c: c.update(input_shape=[None, 64, 32, 1]), "input_shape", "equal"),
        (lambda c: c.update(model_sha256="abc"), "model_sha256", "hex"),
        (lambda c: c["metrics"].update(dice={"body": 1.5}), "metrics.dice.body", "[0, 1]"),
        (lambda c: c.update(lables=[]), "lables", "unknown field"),
        (lambda c: c.pop("version"), "version", "required"),
    ],
)
def test_card_errors_name_the_field(mutate, field, words):
    data = lung_card_dict()
    mutate(data)
    with pytest.raises(ModelCardError) as caught:
        ModelCard.from_dict(data, source="card.json")
    assert caught.value.field == field
    assert str(caught.value).startswith(f"card.json: {field}: ")
    assert words in str(caught.value)


def test_card_constructors_validate_too():
    with pytest.raises(ModelCardError, match=r"^label\.type: is required"):
        OutputLabel(1, "liver", "Liver", category=Code("91723000", "SCT", "Anatomical Structure"))
    with pytest.raises(ModelCardError, match=r"^code\.value: must be at most 16"):
        Code("1" * 17, "SCT", "Too long")


def test_unreadable_card_names_the_file(tmp_path):
    path = tmp_path / "card.json"
    path.write_text("{not json")
    with pytest.raises(ModelCardError, match=f"^{path}: card: cannot read JSON"):
        ModelCard.load(path)


# ------------------------------------------------------------ mapping, orientation


def fake_model(card: ModelCard, scores_of) -> SegmentationModel:
    return SegmentationModel(card=card, model_path=Path("fake"), infer=scores_of)


def test_predict_maps_outputs_to_labels_in_standard_orientation():
    """A fake model calls the canvas' right half lung_left: that must be the patient's left."""
    card = ModelCard.from_dict(lung_card_dict(64))

    def scores(x: np.ndarray) -> np.ndarray:
        out = np.zeros((*x.shape[:3], 4), dtype=np.float32)
        out[..., 1] = x[..., 0] > 0.3  # anything denser than air: body
        out[:, :, 32:, 2] = 2.0 * (x[:, :, 32:, 0] > 0.3)
        out[..., 0] = 0.5
        return out

    spec = PhantomSpec(slices=3, rows=100, columns=120, pixel_spacing_mm=3.0)
    for flip in (False, True):
        volume, labels = phantom_volume(spec, flip_columns=flip)
        masks = fake_model(card, scores).predict(volume, batch_size=2)
        assert list(masks) == [BODY, LUNG_LEFT, LUNG_RIGHT]
        assert all(m.shape == volume.hu.shape and m.dtype == bool for m in masks.values())
        assert not masks[LUNG_RIGHT].any()
        assert masks[LUNG_LEFT].any() and not (masks[LUNG_LEFT] & ~masks[BODY]).any()
        # Patient left is +x: higher columns as stored, lower ones when mirrored.
        column = np.nonzero(masks[LUNG_LEFT])[2].mean()
        assert column < 40 if flip else column > 80


def test_slices_that_are_not_axial_are_refused(shipped):
    volume = ImageVolume(hu=np.zeros((4, 32, 32), np.float32), spacing_mm=(1.0, 1.0, 1.0),
                         affine=np.array([[1.0, 0, 0, 0], [0, 0, 1, 0], [0, -1, 0, 0], [0, 0, 0, 1]]))
    with pytest.raises(NotAxialError, match="not axial"):
        shipped.predict(volume)


# ------------------------------------------------------------------- training


def test_training_smoke_writes_a_model_and_a_valid_card(tiny):
    out, card = tiny
    assert (out / "unet.keras").is_file()
    assert ModelCard.load(out / "card.json") == card
    assert card.input_shape == (None, 64, 64, 1) and card.preprocessing.pixel_spacing_mm == 8.0
    assert card.model_sha256 == cnn.file_sha256(out / "unet.keras")
    assert set(card.metrics["dice"]) == {BODY, LUNG_LEFT, LUNG_RIGHT}
    assert card.training["synthetic"]["volumes"] == 3 and card.training["seed"] == 0


def test_training_is_reproducible(tiny, tmp_path):
    _, card = tiny
    again = train_lungs(tmp_path, **TINY)
    assert again.model_sha256 == card.model_sha256


def test_inference_shapes_and_label_mapping(tiny):
    out, _ = tiny
    model = SegmentationModel.load(out / "unet.keras")
    assert SegmentationModel.load(out / "unet.keras", out / "card.json") is model  # cached
    volume, _ = phantom_volume(PhantomSpec(slices=3, rows=90, columns=70, pixel_spacing_mm=4.0))
    masks = model.predict(volume, batch_size=2)
    assert list(masks) == [BODY, LUNG_LEFT, LUNG_RIGHT]
    for mask in masks.values():
        assert mask.shape == volume.hu.shape and mask.dtype == bool
    assert not ((masks[LUNG_LEFT] | masks[LUNG_RIGHT]) & ~masks[BODY]).any()
    assert not (masks[LUNG_LEFT] & masks[LUNG_RIGHT]).any()
    step = cnn_masks(volume.hu, volume.spacing_mm, volume.affine, out / "unet.keras")
    assert all(np.array_equal(step[k], masks[k]) for k in masks)


def test_a_model_file_that_differs_from_its_card_is_refused(tiny, tmp_path):
    out, _ = tiny
    shutil.copy(out / "unet.keras", tmp_path / "unet.keras")
    data = json.loads((out / "card.json").read_text())
    data["model_sha256"] = "0" * 64
    (tmp_path / "card.json").write_text(json.dumps(data))
    with pytest.raises(ModelLoadError, match="sha256 .* differs from model_sha256 0000"):
        SegmentationModel.load(tmp_path / "unet.keras")


# ---------------------------------------------------------------- user models


def user_model(classes: int, size: int = 64):
    """Class 1 (of 2) where the windowed input is above 0.5, i.e. above -200 HU."""
    import keras

    model = keras.Sequential([keras.Input((size, size, 1)),
                              keras.layers.Conv2D(classes, 1, activation="softmax")])
    kernel = np.zeros((1, 1, 1, classes), np.float32)
    kernel[..., 1] = 40.0
    bias = np.zeros(classes, np.float32)
    bias[1] = -20.0
    model.layers[-1].set_weights([kernel, bias])
    return model


def liver_card_dict(size: int = 64) -> dict:
    data = lung_card_dict(size)
    data["labels"] = [
        {"index": 0, "label": "background", "display": "Background"},
        {"index": 1, "label": "liver", "display": "Liver",
         "category": {"value": "91723000", "scheme": "SCT", "meaning": "Anatomical Structure"},
         "type": {"value": "10200004", "scheme": "SCT", "meaning": "Liver"}},
    ]
    data["output_shape"] = [None, size, size, 2]
    data["postprocessing"] = {"fill_holes": []}
    return data


def test_a_user_model_with_the_wrong_number_of_outputs_is_refused(tmp_path):
    user_model(3).save(tmp_path / "mine.keras")
    (tmp_path / "card.json").write_text(json.dumps(lung_card_dict(64)))
    with pytest.raises(ModelLoadError) as caught:
        SegmentationModel.load(tmp_path / "mine.keras", tmp_path / "card.json")
    message = str(caught.value)
    assert str(tmp_path / "mine.keras") in message
    assert "3 output channels" in message and "maps 4 labels" in message
    assert "background, body, lung_left, lung_right" in message


def test_a_user_model_whose_input_differs_from_its_card_is_refused(tmp_path):
    user_model(2, size=32).save(tmp_path / "mine.keras")
    (tmp_path / "card.json").write_text(json.dumps(liver_card_dict(64)))
    with pytest.raises(ModelLoadError, match=r"input shape \[None, 32, 32, 1\] does not match .*\[None, 64, 64, 1\]"):
        SegmentationModel.load(tmp_path / "mine.keras")


@pytest.mark.parametrize("form", ["mine.keras", "mine.h5", "saved_model"])
def test_a_user_model_with_its_own_label_map_works(tmp_path, form):
    model = user_model(2)
    path = tmp_path / form
    if form == "saved_model":
        model.export(path, verbose=False)
    else:
        model.save(path)
    (tmp_path / "card.json").write_text(json.dumps(liver_card_dict(64)))
    loaded = SegmentationModel.load(path, tmp_path / "card.json")
    hu = np.full((2, 100, 100), -1000.0, np.float32)
    hu[:, 30:70, 40:90] = 60.0
    volume = ImageVolume(hu=hu, spacing_mm=(5.0, 4.0, 4.0),
                         affine=np.array([[0, 0, 4.0, 0], [0, 4.0, 0, 0], [-5.0, 0, 0, 0], [0, 0, 0, 1]]))
    masks = loaded.predict(volume)
    assert list(masks) == ["liver"]
    assert dice(masks["liver"], hu > 0) > 0.9


# ------------------------------------------------------------- shipped model


def test_shipped_model_outputs_match_its_label_map(shipped):
    scores = shipped.infer(np.zeros((2, 256, 256, 1), np.float32))
    assert scores.shape == (2, 256, 256, len(shipped.card.labels))
    assert np.allclose(scores.sum(axis=-1), 1.0, atol=1e-4)
    assert (scores.argmax(axis=-1) == shipped.card.background_index).all()  # air is background


@pytest.mark.parametrize("flip", [False, True], ids=["as-stored", "mirrored-affine"])
def test_shipped_model_segments_a_chest_phantom(shipped, flip):
    spec = PhantomSpec(slices=12, seed=11, ribs=True, heart=True, trachea=True, arms=True)
    volume, labels = phantom_volume(spec, flip_columns=flip)
    masks = shipped.predict(volume)
    assert dice(masks[BODY], labels > 0) > 0.95
    assert dice(masks[LUNG_LEFT], labels == LABEL_LUNG_LEFT) > 0.9
    assert dice(masks[LUNG_RIGHT], labels == LABEL_LUNG_RIGHT) > 0.9


def test_shipped_model_segments_the_default_phantom_with_disease(shipped):
    spec = PhantomSpec(slices=12, seed=2, consolidation=True, ground_glass=True)
    volume, labels = phantom_volume(spec)
    masks = shipped.predict(volume)
    assert dice(masks[LUNG_LEFT], labels == LABEL_LUNG_LEFT) > 0.9
    assert dice(masks[LUNG_RIGHT], labels == LABEL_LUNG_RIGHT) > 0.9


def test_shipped_model_finds_no_lung_in_an_abdomen_with_bowel_and_stomach_gas(shipped):
    spec = PhantomSpec(slices=12, seed=5, lungs=False, stomach_gas=True, bowel_gas=True,
                       diaphragm=True, ribs=True)
    volume, labels = phantom_volume(spec)
    assert (volume.hu[labels > 0] < -900).sum() > 1000  # there is gas inside the body
    masks = shipped.predict(volume)
    lung_ml = (masks[LUNG_LEFT] | masks[LUNG_RIGHT]).sum() * volume.voxel_volume_ml
    assert lung_ml < 0.5
    assert dice(masks[BODY], labels > 0) > 0.95


def test_shipped_model_keeps_stomach_gas_beside_the_lung_bases_out_of_the_lungs(shipped):
    spec = PhantomSpec(slices=16, seed=8, diaphragm=True, lung_taper=0.3, lung_extent=0.8,
                       stomach_gas=True, bowel_gas=True, heart=True, ribs=True)
    volume, labels = phantom_volume(spec)
    masks = shipped.predict(volume)
    gas = (volume.hu < -940) & (labels == 1)
    assert gas.sum() > 500
    assert ((masks[LUNG_LEFT] | masks[LUNG_RIGHT]) & gas).sum() < 0.01 * gas.sum()
    assert dice(masks[LUNG_LEFT], labels == LABEL_LUNG_LEFT) > 0.85
    assert dice(masks[LUNG_RIGHT], labels == LABEL_LUNG_RIGHT) > 0.85


# --------------------------------------------------------------------- imports


def test_importing_the_analysis_modules_does_not_import_tensorflow():
    code = ("import sys, analysis.cnn, analysis.model_card, analysis.training.lungs, analysis.training.unet, "
            "analysis.training.lung_data; print('tensorflow' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
