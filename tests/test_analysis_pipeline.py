"""analysis.pipeline (steps, registry, ct-body-lungs end to end) and analysis.preview."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from analysis import pipeline as pl
from analysis.phantoms.trunk import (
    LABEL_LUNG_LEFT,
    LABEL_LUNG_RIGHT,
    PhantomSpec,
    make_phantom,
)
from analysis.preview import COLOURS, render_overlay
from analysis.types import BODY, LUNG_LEFT, LUNG_RIGHT, ImageVolume


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * int((a & b).sum()) / int(a.sum() + b.sum())


def volume_of(spec: PhantomSpec, lungs: bool = True) -> tuple[ImageVolume, np.ndarray]:
    phantom = make_phantom(dataclasses.replace(spec, lungs=lungs))
    ps, st = spec.pixel_spacing_mm, spec.slice_thickness_mm
    affine = np.array([[0, 0, ps, -100.0], [0, ps, 0, -90.0], [-st, 0, 0, 20.0], [0, 0, 0, 1]])
    return ImageVolume(hu=phantom.hu, spacing_mm=(st, ps, ps), affine=affine), phantom.labels


@pytest.fixture(scope="module")
def chest():
    """512 x 512 in-plane, so the pipeline's downsample and upsample both run."""
    return volume_of(PhantomSpec(slices=10, rows=512, columns=512, pixel_spacing_mm=0.75))


@pytest.fixture(scope="module")
def chest_result(chest):
    return pl.get_pipeline("ct-body-lungs-classical").run(chest[0])


# ------------------------------------------------------------------------ registry


def test_registry_lists_the_ct_pipelines():
    assert {"ct-body-lungs", "ct-body"} <= set(pl.pipeline_names())
    assert pl.pipeline_names() == sorted(pl.pipeline_names())
    assert pl.get_pipeline("ct-body-lungs").name == "ct-body-lungs"


def test_unknown_pipeline_names_the_known_ones():
    with pytest.raises(pl.UnknownPipeline) as caught:
        pl.get_pipeline("ct-lungs-typo")
    assert isinstance(caught.value, KeyError)
    assert str(caught.value) == (
        f"unknown pipeline 'ct-lungs-typo'; known pipelines: {', '.join(pl.pipeline_names())}"
    )


def test_register_refuses_to_shadow_unless_asked():
    original = pl.get_pipeline("ct-body")
    with pytest.raises(ValueError, match="already registered"):
        pl.register_pipeline(pl.Pipeline("ct-body", ()))
    try:
        replacement = pl.register_pipeline(pl.Pipeline("ct-body", ()), replace=True)
        assert pl.get_pipeline("ct-body") is replacement
    finally:
        pl.register_pipeline(original, replace=True)
    assert pl.get_pipeline("ct-body") is original


# -------------------------------------------------------------------------- wiring


def tiny_volume() -> ImageVolume:
    return ImageVolume(hu=np.zeros((2, 4, 4), np.float32), spacing_mm=(1, 1, 1), affine=np.eye(4))


def test_steps_run_in_order_with_declared_values_and_are_timed():
    seen: list[str] = []

    def threshold(hu):
        seen.append("threshold")
        return hu > -1, "note"

    def collect(mask, note, notes):
        seen.append("collect")
        return {BODY: mask}, [], [*notes, note]

    custom = pl.Pipeline("custom", (
        pl.Step("threshold", threshold, ("hu",), ("mask", "note")),
        pl.Step("collect", collect, ("mask", "note", "notes"), ("masks", "measurements", "notes")),
    ))
    result = custom.run(tiny_volume())
    assert seen == ["threshold", "collect"]
    assert result.pipeline == "custom" and result.masks[BODY].all()
    assert list(result.timings_s) == ["threshold", "collect"]
    assert all(t >= 0 for t in result.timings_s.values())
    assert result.notes == ["note"]


def test_missing_input_names_the_step_and_the_value():
    broken = pl.Pipeline("broken", (pl.Step("needs", lambda x: x, ("nowhere",), ("masks",)),))
    with pytest.raises(pl.PipelineError, match=r"step 'needs': missing input\(s\) \['nowhere'\]"):
        broken.run(tiny_volume())


def test_wrong_number_of_outputs_is_reported():
    broken = pl.Pipeline("broken", (pl.Step("two", lambda hu: hu, ("hu",), ("a", "b")),))
    with pytest.raises(pl.PipelineError, match="step 'two' must return 2 values"):
        broken.run(tiny_volume())


def test_pipeline_without_masks_is_refused():
    with pytest.raises(pl.PipelineError, match="produced no 'masks'"):
        pl.Pipeline("empty", ()).run(tiny_volume())


# -------------------------------------------------------------------- ct-body-lungs


def test_ct_body_lungs_masks_on_the_source_grid(chest, chest_result):
    volume, labels = chest
    result = chest_result
    assert result.pipeline == "ct-body-lungs-classical"
    assert list(result.masks) == [BODY, LUNG_LEFT, LUNG_RIGHT]
    for mask in result.masks.values():
        assert mask.dtype == bool and mask.shape == volume.hu.shape
    assert dice(result.masks[BODY], labels > 0) > 0.95
    assert dice(result.masks[LUNG_LEFT], labels == LABEL_LUNG_LEFT) > 0.9
    assert dice(result.masks[LUNG_RIGHT], labels == LABEL_LUNG_RIGHT) > 0.9
    assert set(result.timings_s) == {step.name for step in pl.get_pipeline("ct-body-lungs-classical").steps}
    assert result.notes == []


def test_ct_body_lungs_measures_on_the_original_hu(chest, chest_result):
    volume, _ = chest
    by_label = {m.label: m for m in chest_result.measurements}
    assert list(by_label) == [BODY, LUNG_LEFT, LUNG_RIGHT]
    for label, m in by_label.items():
        mask = chest_result.masks[label]
        assert m.voxels == int(mask.sum())
        assert m.volume_ml == pytest.approx(m.voxels * volume.voxel_volume_ml)
        assert m.mean_hu == pytest.approx(float(volume.hu[mask].mean()), abs=0.01)
    assert -900 < by_label[LUNG_LEFT].mean_hu < -700
    assert by_label[BODY].surface_area_mm2 > by_label[LUNG_LEFT].surface_area_mm2 > 0


def test_abdomen_gives_empty_lung_masks_and_no_lung_measurements():
    volume, labels = volume_of(PhantomSpec(slices=10, rows=128, columns=128, pixel_spacing_mm=3.0,
                                           stomach_gas=True, bowel_gas=True), lungs=False)
    result = pl.get_pipeline("ct-body-lungs-classical").run(volume)
    assert list(result.masks) == [BODY, LUNG_LEFT, LUNG_RIGHT]
    assert not result.masks[LUNG_LEFT].any() and not result.masks[LUNG_RIGHT].any()
    assert [m.label for m in result.measurements] == [BODY]
    assert result.notes == ["lung_left: not found", "lung_right: not found"]


def test_ct_body_has_only_the_body():
    volume, labels = volume_of(PhantomSpec(slices=4, rows=96, columns=96, pixel_spacing_mm=4.0))
    result = pl.get_pipeline("ct-body").run(volume)
    assert list(result.masks) == [BODY]
    assert dice(result.masks[BODY], labels > 0) > 0.95


# -------------------------------------------------------------------------- preview


def has_colour(image: np.ndarray, colour: tuple[int, int, int]) -> bool:
    return bool((image == np.array(colour, np.uint8)).all(axis=-1).any())


def test_preview_is_rgb_with_each_masks_colour(chest, chest_result):
    image = render_overlay(chest[0], chest_result.masks)
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert image.shape[0] > 384 and image.shape[1] > 384  # a 2x2 montage of 384 px tiles
    for label in (BODY, LUNG_LEFT, LUNG_RIGHT):
        assert has_colour(image, COLOURS[label])
    empty = {label: np.zeros_like(mask) for label, mask in chest_result.masks.items()}
    blank = render_overlay(chest[0], empty)
    assert not any(has_colour(blank, COLOURS[label]) for label in (BODY, LUNG_LEFT, LUNG_RIGHT))


def test_preview_shows_the_patients_left_on_the_right_whatever_the_storage(chest, chest_result):
    volume, _ = chest
    masks = {LUNG_LEFT: chest_result.masks[LUNG_LEFT]}
    mirrored_affine = volume.affine.copy()
    mirrored_affine[0, 2] *= -1
    mirrored = ImageVolume(
        hu=volume.hu[:, :, ::-1], spacing_mm=volume.spacing_mm, affine=mirrored_affine
    )
    normal = render_overlay(volume, masks, tiles=1)
    flipped = render_overlay(mirrored, {LUNG_LEFT: masks[LUNG_LEFT][:, :, ::-1]}, tiles=1)
    np.testing.assert_array_equal(normal, flipped)
    blue = (normal == np.array(COLOURS[LUNG_LEFT], np.uint8)).all(axis=-1)
    assert np.argwhere(blue)[:, 1].mean() > normal.shape[1] / 2


def test_preview_single_slice_and_bad_mask_shape():
    volume, _ = volume_of(PhantomSpec(slices=1, rows=64, columns=96, pixel_spacing_mm=4.0))
    image = render_overlay(volume, {BODY: volume.hu > -500})
    assert image.shape == (256, 384, 3)
    with pytest.raises(ValueError, match="shape"):
        render_overlay(volume, {BODY: np.zeros((1, 3, 3), bool)})
