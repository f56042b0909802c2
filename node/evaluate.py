"""``pacsnode evaluate``: how well the models do on series with known answers.

Two kinds of reference:

* masks, from a DICOM SEG in the same folders that references the series: its
  segments are matched to ours by their SNOMED CT segmented property type (left lung,
  right lung, lung = both, entire body); Dice is reported for the final mask and for
  the CNN's and the classical segmenter's on their own;
* reference SEGs stored elsewhere (``--reference SEG|DIR``, e.g. from
  ``pacsnode reference``), matched the same way;
* for series whose reference says no lung (a reference SEG without lung, or a region
  in :data:`NO_LUNG_REGIONS`), the false lung of each segmenter: its volume (mL) and
  its worst slice (cm2), against the targets of < 5 mL per series, < 2 cm2 per slice;
* region labels, given as ``REGION=PATH`` (every series under PATH is that region) or
  a JSON file mapping Series Instance UIDs or paths to regions.

``--synthetic N`` evaluates on generated phantoms held back from training instead.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import Dataset

from analysis.pipeline import dice
from analysis.types import BODY, LUNG_LEFT, LUNG_RIGHT, ImageVolume, PipelineResult
from node.config import Settings

#: SNOMED CT segmented property type -> the labels whose union it is.
REFERENCE_TYPES: Mapping[str, tuple[str, ...]] = {
    "44029006": (LUNG_LEFT,),
    "3341006": (LUNG_RIGHT,),
    "39607008": (LUNG_LEFT, LUNG_RIGHT),  # "Lung": both lungs in one segment
    "38266002": (BODY,),
}
LUNGS = "lungs"  # the name of the union of both lungs in reports
#: Regions with no lung: the false lung of series labelled so is reported.
NO_LUNG_REGIONS = frozenset({"head", "pelvis", "other"})


@dataclass
class SeriesScore:
    """What one series scored."""

    series: str
    source: str
    dice: dict[str, dict[str, float]] = field(default_factory=dict)  # structure -> segmenter
    region_expected: str | None = None
    region_predicted: str | None = None
    region_probability: float | None = None
    notes: list[str] = field(default_factory=list)
    #: segmenter -> {"volume_ml", "worst_slice_cm2"} where the reference has no lung.
    false_lung: dict[str, dict[str, float]] = field(default_factory=dict)
    #: lung -> {"slices": slices holding it, segmenter: slices where it found none of it}.
    missed_slices: dict[str, dict[str, int]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        region = None
        if self.region_expected is not None:
            region = {"expected": self.region_expected, "predicted": self.region_predicted,
                      "probability": self.region_probability,
                      "correct": self.region_expected == self.region_predicted}
        return {"series": self.series, "source": self.source,
                "dice": {k: {s: round(v, 4) for s, v in d.items()} for k, d in self.dice.items()},
                "region": region, "notes": self.notes,
                "false_lung": {k: {m: round(v, 2) for m, v in d.items()}
                               for k, d in self.false_lung.items()},
                "missed_slices": self.missed_slices}


def _segmenters(result: PipelineResult) -> dict[str, Mapping[str, np.ndarray]]:
    """The final masks and each segmenter's own, by name."""
    return {"final": result.masks, **result.candidates}


def score_masks(result: PipelineResult, reference: Mapping[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Dice of the final, CNN and classical masks against each reference structure."""
    segmenters = _segmenters(result)
    scores: dict[str, dict[str, float]] = {}
    for structure, truth in reference.items():
        labels = (LUNG_LEFT, LUNG_RIGHT) if structure == LUNGS else (structure,)
        for name, masks in segmenters.items():
            if all(label in masks for label in labels):
                found = np.logical_or.reduce([masks[label] for label in labels])
                scores.setdefault(structure, {})[name] = dice(found, truth)
    return scores


#: A slice holds a lung when the reference has at least this much of it there (slivers
#: at an apex or a base, under a square centimetre, are left out of the count).
MIN_HELD_CM2 = 1.0


def missed_slices(result: PipelineResult, reference: Mapping[str, np.ndarray],
                  volume: ImageVolume) -> dict[str, dict[str, int]]:
    """Per lung of the reference, the slices holding it, and per segmenter the slices on
    which it found none of it (the issue's "both lungs found wherever a slice holds lung")."""
    pixel_cm2 = volume.spacing_mm[1] * volume.spacing_mm[2] / 100.0
    out: dict[str, dict[str, int]] = {}
    for label in (LUNG_LEFT, LUNG_RIGHT):
        if label not in reference:
            continue
        truth = reference[label]
        held = truth.sum(axis=(1, 2)) * pixel_cm2 >= MIN_HELD_CM2
        counts = {"slices": int(held.sum())}
        for name, masks in _segmenters(result).items():
            if label in masks:
                found = (masks[label] & truth).any(axis=(1, 2))
                counts[name] = int((held & ~found).sum())
        out[label] = counts
    return out


def false_lung(result: PipelineResult, volume: ImageVolume) -> dict[str, dict[str, float]]:
    """Per segmenter, the lung it found where there is none: mL, and cm2 on its worst slice."""
    pixel_cm2 = volume.spacing_mm[1] * volume.spacing_mm[2] / 100.0
    out = {}
    for name, masks in _segmenters(result).items():
        lung = [masks[label] for label in (LUNG_LEFT, LUNG_RIGHT) if label in masks]
        if not lung:
            continue
        found = np.logical_or.reduce(lung)
        per_slice = found.sum(axis=(1, 2))
        out[name] = {"volume_ml": float(found.sum()) * volume.voxel_volume_ml,
                     "worst_slice_cm2": float(per_slice.max(initial=0)) * pixel_cm2}
    return out


def reference_segs(paths: Sequence[str | Path]) -> dict[str, Dataset]:
    """Series Instance UID -> the reference SEG for it, from SEG files or folders."""
    import pydicom

    from node.dicom.scu import iter_files

    found: dict[str, Dataset] = {}
    for path in iter_files(paths):
        try:
            ds = pydicom.dcmread(path)
        except Exception:  # not DICOM: not a reference
            continue
        if ds.get("Modality") != "SEG":
            continue
        for ref in ds.get("ReferencedSeriesSequence", []):
            found[str(ref.SeriesInstanceUID)] = ds
    return found


def summarise(scores: Sequence[SeriesScore]) -> dict[str, Any]:
    """Mean Dice per structure and segmenter, and the region accuracy."""
    per: dict[str, dict[str, list[float]]] = {}
    for score in scores:
        for structure, by in score.dice.items():
            for name, value in by.items():
                per.setdefault(structure, {}).setdefault(name, []).append(value)
    dice_summary = {
        structure: {name: {"mean": round(statistics.fmean(v), 4), "min": round(min(v), 4),
                           "n": len(v)} for name, v in by.items()}
        for structure, by in per.items()
    }
    labelled = [s for s in scores if s.region_expected is not None]
    correct = sum(s.region_expected == s.region_predicted for s in labelled)
    confusion: dict[str, dict[str, int]] = {}
    for s in labelled:
        row = confusion.setdefault(str(s.region_expected), {})
        row[str(s.region_predicted)] = row.get(str(s.region_predicted), 0) + 1
    missed: dict[str, dict[str, int]] = {}
    for score in scores:
        for label, counts in score.missed_slices.items():
            for name, n in counts.items():
                missed.setdefault(label, {})[name] = missed.get(label, {}).get(name, 0) + n
    return {
        "dice": dice_summary,
        "missed_slices": missed,
        "region": {"accuracy": round(correct / len(labelled), 4) if labelled else None,
                   "correct": correct, "n": len(labelled), "confusion": confusion},
    }


# -- real series from folders ------------------------------------------------------------


def _reference_from_seg(seg_ds: Dataset, sources: Sequence[Dataset],
                        shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """The SEG's structures we know, as masks in volume order (``sources`` order)."""
    import highdicom as hd

    seg = hd.seg.Segmentation.from_dataset(seg_ds, copy=False)
    reference: dict[str, np.ndarray] = {}
    uids = [str(ds.SOPInstanceUID) for ds in sources]
    for item in seg.SegmentSequence:
        kind = str(item.SegmentedPropertyTypeCodeSequence[0].CodeValue)
        labels = REFERENCE_TYPES.get(kind)
        if labels is None:
            continue
        pixels = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=uids, segment_numbers=[int(item.SegmentNumber)],
            assert_missing_frames_are_empty=True, ignore_spatial_locations=True)
        mask = pixels[..., 0].astype(bool).reshape(shape)
        name = LUNGS if len(labels) == 2 else labels[0]
        reference[name] = reference.get(name, np.zeros(shape, bool)) | mask
    return reference


def _regions_for(labels: Mapping[str, str]) -> dict[str, str]:
    """Series UID or resolved path -> region, from the user's labels."""
    return {str(Path(k).resolve()) if Path(k).exists() else k: v for k, v in labels.items()}


def _expected_region(uid: str, files: Sequence[str], regions: Mapping[str, str]) -> str | None:
    if uid in regions:
        return regions[uid]
    for path, region in regions.items():
        if any(str(Path(f).resolve()).startswith(path) for f in files):
            return region
    return None


def evaluate_paths(
    paths: Sequence[str | Path], settings: Settings, *, pipeline: str = "ct-body-lungs",
    regions: Mapping[str, str] | None = None, references: Sequence[str | Path] = (),
    model: str | None = None,
) -> list[SeriesScore]:
    """Score every image series under ``paths`` that has a reference SEG (beside it or
    under ``references``) or a region; ``model`` names a configured model to use in
    place of the shipped U-Net."""
    from analysis.pipeline import get_pipeline
    from node.dicom.scu import iter_files
    from node.workflow.analyze import (
        AnalysisRefused,
        load_series,
        pipeline_context,
        predict_region,
    )
    from node.workflow.routing import facts_from_datasets, never_analysed

    regions = _regions_for(regions or {})
    by_series: dict[str, list[Dataset]] = {}
    files: dict[str, list[str]] = {}
    import pydicom

    for path in iter_files(paths):
        try:
            ds = pydicom.dcmread(path)
            uid = str(ds.SeriesInstanceUID)
        except Exception:  # not DICOM: nothing to evaluate
            continue
        by_series.setdefault(uid, []).append(ds)
        files.setdefault(uid, []).append(str(path))
    segs = {str(ref.SeriesInstanceUID): ds for datasets in by_series.values() for ds in datasets
            if ds.get("Modality") == "SEG" for ref in ds.get("ReferencedSeriesSequence", [])}
    segs.update(reference_segs(references) if references else {})
    chosen = get_pipeline(pipeline)
    scores = []
    for uid, datasets in by_series.items():
        if never_analysed(facts_from_datasets(uid, datasets)):
            continue
        expected = _expected_region(uid, files[uid], regions)
        if uid not in segs and expected is None:
            continue
        score = SeriesScore(uid, files[uid][0], region_expected=expected)
        try:
            loaded = load_series(datasets, {})
        except AnalysisRefused as exc:
            score.notes.append(str(exc))
            scores.append(score)
            continue
        region = predict_region(loaded, {})
        if region is not None:
            score.region_predicted, score.region_probability = region.label, region.probability
        reference: dict[str, np.ndarray] = {}
        if uid in segs:
            sources = [loaded.images[i] for i in loaded.order]
            reference = _reference_from_seg(segs[uid], sources, loaded.volume.hu.shape)
            if not reference:
                score.notes.append("the reference SEG has no body or lung segment")
        no_lung = expected in NO_LUNG_REGIONS and not reference
        if reference or no_lung:
            result = chosen.run(loaded.volume, pipeline_context(chosen, settings, model))
            score.dice = score_masks(result, reference)
            score.missed_slices = missed_slices(result, reference, loaded.volume)
            score.notes += result.notes
            if no_lung:
                score.false_lung = false_lung(result, loaded.volume)
        scores.append(score)
    return scores


def load_region_labels(items: Sequence[str], json_file: str | None) -> dict[str, str]:
    """``REGION=PATH`` items and an optional JSON file -> key -> region."""
    labels: dict[str, str] = {}
    if json_file:
        data = json.loads(Path(json_file).read_text())
        if not isinstance(data, dict):
            raise ValueError(f"{json_file}: must map series UIDs or paths to regions")
        labels.update({str(k): str(v) for k, v in data.items()})
    for item in items:
        region, sep, path = item.partition("=")
        if not sep or not path:
            raise ValueError(f"--region {item!r}: expected REGION=PATH, e.g. chest=/data/ct1")
        labels[path] = region
    return labels


def evaluate_volume(
    volume: ImageVolume, truth: Mapping[str, np.ndarray], settings: Settings, name: str,
    *, expected_region: str | None = None, pipeline: str = "ct-body-lungs",
    model: str | None = None,
) -> SeriesScore:
    """Score one generated volume with its true masks (and region); ``model`` names a
    configured model in place of the shipped U-Net."""
    from analysis.pipeline import get_pipeline
    from analysis.region import load_region_model
    from node.workflow.analyze import pipeline_context

    chosen = get_pipeline(pipeline)
    result = chosen.run(volume, pipeline_context(chosen, settings, model))
    score = SeriesScore(name, "synthetic", dice=score_masks(result, truth),
                        region_expected=expected_region, notes=list(result.notes),
                        missed_slices=missed_slices(result, truth, volume))
    if expected_region is not None:
        prediction = load_region_model().predict(volume)
        score.region_predicted, score.region_probability = prediction.label, prediction.probability
    return score


# -- generated series held back from training ------------------------------------------


def _truth(labels: np.ndarray) -> dict[str, np.ndarray]:
    """Phantom labels (0 outside, 1 body, 2 left lung, 3 right lung) as masks."""
    return {BODY: labels > 0, LUNG_LEFT: labels == 2, LUNG_RIGHT: labels == 3}


def evaluate_synthetic(settings: Settings, count: int, seed: int = 0,
                       model: str | None = None) -> list[SeriesScore]:
    """``count`` held-back phantoms per region, and ``count`` held-back volumes of the
    lung model's own generator (odd ones mirrored, to check left and right)."""
    from analysis.phantoms.regions import make_region_phantom, phantom_volume
    from analysis.region import REGIONS
    from analysis.training.lungs import eval_volume
    from analysis.training.region import phantom_seeds

    scores = []
    for region in REGIONS:
        for phantom_seed in phantom_seeds(region, count, seed, held_back=True):
            phantom = make_region_phantom(region, phantom_seed, max_slices=48)
            scores.append(evaluate_volume(
                phantom_volume(phantom), _truth(phantom.labels), settings,
                f"{region} phantom {phantom_seed}", expected_region=region, model=model))
    for index in range(count):
        generated, volume = eval_volume(seed, index)
        labels = generated.labels[:, :, ::-1] if index % 2 else generated.labels
        scores.append(evaluate_volume(volume, _truth(labels), settings,
                                      f"lung-model held-back {generated.kind} {index}",
                                      model=model))
    return scores


def format_report(scores: Sequence[SeriesScore], summary: Mapping[str, Any]) -> str:
    """The summary as a table a person reads."""
    lines = [f"{len(scores)} series evaluated", "", "Dice (mean, min over series)"]
    lines.append(f"  {'structure':<12} " + " ".join(f"{n:>18}" for n in ("final", "cnn", "classical")))
    for structure, by in summary["dice"].items():
        cells = []
        for name in ("final", "cnn", "classical"):
            item = by.get(name)
            cells.append(f"{item['mean']:.3f} ({item['min']:.3f}) n={item['n']}" if item else "-")
        lines.append(f"  {structure:<12} " + " ".join(f"{c:>18}" for c in cells))
    region = summary["region"]
    if region["n"]:
        lines += ["", f"Region accuracy {region['accuracy']:.3f} ({region['correct']}/{region['n']})",
                  "  confusion (expected -> predicted): " + json.dumps(region["confusion"])]
    for score in (s for s in scores if s.false_lung):
        cells = ", ".join(f"{n} {v['volume_ml']:.1f} mL (worst slice {v['worst_slice_cm2']:.1f} cm2)"
                          for n, v in score.false_lung.items())
        lines.append(f"  false lung in {score.source}: {cells}")
    for score in (s for s in scores if any(c.get("final") for c in s.missed_slices.values())):
        cells = ", ".join(f"{label} on {c['final']} of {c['slices']} slices"
                          for label, c in score.missed_slices.items() if c.get("final"))
        lines.append(f"  lung missed in {score.source}: {cells}")
    misses = [s for s in scores if s.region_expected and s.region_expected != s.region_predicted]
    for score in misses:
        lines.append(f"  miss: {score.series}: expected {score.region_expected}, predicted "
                     f"{score.region_predicted} ({score.region_probability or 0:.2f})")
    return "\n".join(lines)
