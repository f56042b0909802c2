"""Which anatomical region a CT series shows, predicted from its pixels.

A classical model: :func:`analysis.features.series_features` (intensity, shape, air,
bone arrangement, GLCM texture; physical units; :data:`MODEL_FEATURES` of them) ->
scikit-learn ``Pipeline`` (``StandardScaler`` -> ``SelectKBest`` -> extremely
randomized trees, a random forest or an SVM), trained on whole phantom series and on
single slices of them, so that one slice or a short series is classified as well. The top class is
reported only when its probability reaches the threshold stored in the model card,
else the label is :data:`OTHER`; that also covers what the model never saw (a neck,
a leg, a whole body, a scout). A series whose body the field of view cuts (a crop
around a limb or a tumour: :func:`analysis.features.edge_contact`) is :data:`OTHER`
by rule, with the reason.

A trained model is a directory: ``model.joblib`` (the pickled pipeline) and
``card.json`` (the model card: labels, threshold, features, training data, metrics,
scikit-learn version, the pickle's SHA-256). :meth:`RegionModel.load` validates the
card (:mod:`analysis.region_card`), naming the field at fault, checks the pickle against
it and refuses a model pickled by another scikit-learn minor version. Pickles run code
when loaded: load only models you trust (the one shipped in ``analysis/models/region``
or your own).

The DICOM header's ``BodyPartExamined`` can then be checked against a confident
prediction with :func:`body_part_contradiction`.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import threading
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import sklearn
from sklearn.ensemble import ExtraTreesClassifier, RandomForestClassifier
from sklearn.exceptions import InconsistentVersionWarning
from sklearn.feature_selection import SelectKBest, f_classif, mutual_info_classif
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from analysis.features import (
    SERIES_FEATURES,
    NoBodyError,
    feature_vector,
    series_features,
)
from analysis.model_card import ModelCardError
from analysis.region_card import (
    CARD_FILE,
    CLASSIFIERS,
    REGIONS,
    SCORE_FUNCTIONS,
    validate_card,
)
from analysis.types import ImageVolume

OTHER = "other"
#: Four regions: a top probability under 0.4 is close to a guess between two of them.
DEFAULT_THRESHOLD = 0.4
DEFAULT_CLASSIFIER = "et"
#: Above this fraction of slices cut by the field of view, a series is not classified.
MAX_FOV_CUT_FRACTION = 0.5
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "models" / "region"
MODEL_FILE = "model.joblib"
#: The slice normal must be within this of the patient's z axis: the features assume
#: axial slices (45 degrees also admits any real gantry tilt).
_MAX_OBLIQUITY_DEG = 45.0


#: Features left out of the models this code trains: histogram-shape moments and soft-
#: tissue texture describe the generator's noise and flat organs more than anatomy, and
#: were what set real scans apart from phantoms; ``fov_cut_frac`` is a rule
#: (:data:`MAX_FOV_CUT_FRACTION`), and constant on phantoms.
PHANTOM_SPECIFIC_FEATURES: tuple[str, ...] = (
    "hu_skewness",
    "hu_kurtosis",
    "hu_entropy",
    "fov_cut_frac",
    *[n for n in SERIES_FEATURES if n.startswith("glcm_soft_")],
)
#: The input columns of a model trained by this code, in this order.
MODEL_FEATURES: tuple[str, ...] = tuple(
    n for n in SERIES_FEATURES if n not in PHANTOM_SPECIFIC_FEATURES
)


#: Every model feature (SelectKBest keeps all): with the phantom-specific ones left
#: out, selecting fewer only made the model rely on fewer cues, and worse on real CT.
DEFAULT_K = len(MODEL_FEATURES)


class ModelVersionError(RuntimeError):
    """The model was pickled by a scikit-learn version this one cannot be trusted to load."""


@dataclass(frozen=True)
class RegionPrediction:
    """A region prediction for one series.

    Attributes
    ----------
    label
        One of :data:`REGIONS`, or :data:`OTHER` when the top probability is below the
        model's threshold or the series cannot be classified (see ``reason``).
    probability
        The top class's probability (0 when nothing could be computed).
    probabilities
        Every region's probability.
    reason
        Why the label is :data:`OTHER`, else None.
    """

    label: str
    probability: float
    probabilities: dict[str, float] = field(default_factory=dict)
    reason: str | None = None

    @property
    def confident(self) -> bool:
        return self.label != OTHER


# ----------------------------------------------------------------------------- pipeline


def mutual_info_scores(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``mutual_info_classif`` with a fixed seed, so feature selection is reproducible."""
    return mutual_info_classif(x, y, random_state=0)


def build_pipeline(
    classifier: str = DEFAULT_CLASSIFIER,
    *,
    k: int = DEFAULT_K,
    score_func: str = "f_classif",
    seed: int = 0,
) -> Pipeline:
    """An unfitted ``StandardScaler -> SelectKBest -> classifier`` pipeline.

    Parameters
    ----------
    classifier
        ``"et"``: extremely randomized trees (100, balanced class weights, leaves of at
        least 2), whose random split points give smoother probabilities than the forest's
        and generalised best from phantoms to real CT (``docs/models.md``); ``"rf"``: a
        random forest (300 trees, balanced class weights); ``"svm"``: an RBF
        SVC with Platt-scaled probabilities.
    k
        Features kept by ``SelectKBest`` (all of them if larger than their number).
    score_func
        ``"f_classif"`` (ANOVA F, fast, deterministic) or ``"mutual_info"``.
    seed
        Random state of the classifier.
    """
    if classifier not in CLASSIFIERS:
        raise ValueError(f"classifier must be one of {', '.join(CLASSIFIERS)}, got {classifier!r}")
    if score_func not in SCORE_FUNCTIONS:
        raise ValueError(
            f"score_func must be one of {', '.join(SCORE_FUNCTIONS)}, got {score_func!r}"
        )
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    score = f_classif if score_func == "f_classif" else mutual_info_scores
    model: Any
    if classifier in ("et", "rf"):
        # Extra trees: 100 were as accurate on the real slices as 300 and steadier
        # across seeds (docs/models.md), at a third of the pickle. n_jobs=1: workers
        # run one series each; threads would only contend.
        forest = ExtraTreesClassifier if classifier == "et" else RandomForestClassifier
        model = forest(
            n_estimators=100 if classifier == "et" else 300,
            min_samples_leaf=2,
            class_weight="balanced",
            random_state=seed,
            n_jobs=1,
        )
    else:
        model = SVC(
            kernel="rbf",
            C=3.0,
            gamma="scale",
            probability=True,
            class_weight="balanced",
            random_state=seed,
        )
    return Pipeline(
        [
            ("scale", StandardScaler()),
            ("select", SelectKBest(score, k=min(k, len(MODEL_FEATURES)))),
            ("classify", model),
        ]
    )


# -------------------------------------------------------------------------------- model


class RegionModel:
    """A fitted pipeline with its model card.

    Parameters
    ----------
    pipeline
        Fitted; ``classes_`` must be the card's ``labels``.
    card
        A model card (see :func:`validate_card`).
    """

    def __init__(self, pipeline: Pipeline, card: Mapping[str, Any]) -> None:
        self.card: dict[str, Any] = validate_card(card)
        classes = [str(c) for c in getattr(pipeline, "classes_", [])]
        if sorted(classes) != sorted(self.card["labels"]):
            raise ModelCardError(
                "labels", f"{self.card['labels']}, but the model predicts {classes}", source=CARD_FILE
            )
        # scikit-learn orders classes alphabetically; the card lists them anatomically.
        self._columns = [classes.index(label) for label in self.card["labels"]]
        n_in = getattr(pipeline, "n_features_in_", None)
        if n_in is not None and n_in != len(self.card["features"]["input"]):
            raise ModelCardError(
                "features.input",
                f"{len(self.card['features']['input'])} features, but the model takes {n_in}",
                source=CARD_FILE,
            )
        self.pipeline = pipeline

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(self.card["labels"])

    @property
    def threshold(self) -> float:
        return float(self.card["threshold"])

    @property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(self.card["features"]["input"])

    def predict(self, volume: ImageVolume, body: np.ndarray | None = None) -> RegionPrediction:
        """Predict the region of a series.

        Parameters
        ----------
        volume
            The series in HU.
        body
            Its body mask (:func:`analysis.segment.segment_body`), if already computed.

        Returns
        -------
        RegionPrediction
            :data:`OTHER` with a reason for a series without a body or whose slices are
            not axial (the features assume axial cross-sections).
        """
        obliquity = _obliquity_deg(volume.affine)
        if obliquity > _MAX_OBLIQUITY_DEG:
            return RegionPrediction(
                OTHER, 0.0, {}, f"slices are {obliquity:.0f} degrees off axial; not classified"
            )
        try:
            features = series_features(volume, body)
        except NoBodyError as exc:
            return RegionPrediction(OTHER, 0.0, {}, str(exc))
        return self.predict_features(features)

    def predict_features(self, features: Mapping[str, float]) -> RegionPrediction:
        """Predict from features named as in the card's ``features.input`` (see
        :func:`decide` for when the answer is :data:`OTHER`)."""
        row = feature_vector(features, self.feature_names)
        return decide(self.labels, self.probabilities(row[None, :])[0], self.threshold,
                      float(features.get("fov_cut_frac", 0.0)))

    def probabilities(self, rows: np.ndarray) -> np.ndarray:
        """Class probabilities, ``(n, len(labels))`` in the order of :attr:`labels`, for
        feature rows whose columns follow :attr:`feature_names`."""
        probs = self.pipeline.predict_proba(np.asarray(rows, dtype=np.float64))
        return np.asarray(probs, dtype=np.float64)[:, self._columns]

    # ------------------------------------------------------------------------ storage

    def save(self, directory: Path | str) -> Path:
        """Write ``model.joblib`` and ``card.json`` (with the pickle's SHA-256) to ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        model_path = directory / MODEL_FILE
        joblib.dump(self.pipeline, model_path, compress=3)
        self.card["model_file"] = MODEL_FILE
        self.card["model_sha256"] = _sha256(model_path)
        self.card["sklearn_version"] = sklearn.__version__
        validate_card(self.card)
        text = json.dumps(self.card, indent=2, sort_keys=False) + "\n"
        (directory / CARD_FILE).write_text(text, encoding="utf-8")
        return directory

    @classmethod
    def load(cls, directory: Path | str, *, allow_version_mismatch: bool = False) -> RegionModel:
        """Load a saved model, validating its card and its pickle.

        Raises
        ------
        FileNotFoundError
            ``card.json`` or ``model.joblib`` is missing.
        ModelCardError
            The card is invalid (the error names the field) or does not match the pickle.
        ModelVersionError
            The pickle comes from another scikit-learn major or minor version (unless
            ``allow_version_mismatch``; a different patch release only warns).
        """
        directory = Path(directory)
        card_path = directory / CARD_FILE
        if not card_path.is_file():
            raise FileNotFoundError(f"no {CARD_FILE} in {directory}")
        try:
            raw = json.loads(card_path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise ModelCardError("card", f"cannot read JSON: {exc}", source=str(card_path)) from None
        card = validate_card(raw, source=str(card_path))
        model_path = directory / card["model_file"]
        if not model_path.is_file():
            raise FileNotFoundError(
                f"no {card['model_file']} in {directory} (named by the card's model_file)"
            )
        if _sha256(model_path) != card["model_sha256"]:
            raise ModelCardError(
                "model_sha256",
                f"does not match {model_path.name}: the model file was changed",
                source=str(card_path),
            )
        check_sklearn_version(card["sklearn_version"], allow_mismatch=allow_version_mismatch)
        with warnings.catch_warnings():
            # Already checked above, with a clearer message.
            warnings.simplefilter("ignore", category=InconsistentVersionWarning)
            pipeline = joblib.load(model_path)
        return cls(pipeline, card)


def decide(labels: Sequence[str], probs: np.ndarray, threshold: float,
           fov_cut_frac: float = 0.0) -> RegionPrediction:
    """The region for class probabilities ``probs`` (in the order of ``labels``).

    :data:`OTHER` with the reason when the top probability is below ``threshold``, or
    when the field of view cuts the body on more than :data:`MAX_FOV_CUT_FRACTION` of
    the slices (a crop around a limb or a lesion: a partial cross-section does not show
    which region it is), whatever the classifier says.
    """
    probabilities = {label: float(p) for label, p in zip(labels, probs, strict=True)}
    best = int(np.argmax(probs))
    top = float(probs[best])
    if fov_cut_frac > MAX_FOV_CUT_FRACTION:
        return RegionPrediction(
            OTHER, top, probabilities,
            f"the field of view cuts the body on {fov_cut_frac:.0%} of the slices (a crop); "
            "a partial cross-section is not classified",
        )
    if top < threshold:
        return RegionPrediction(
            OTHER, top, probabilities,
            f"top probability {top:.2f} ({labels[best]}) below {threshold:.2f}",
        )
    return RegionPrediction(labels[best], top, probabilities)


def check_sklearn_version(trained_with: str, *, allow_mismatch: bool = False) -> None:
    """Refuse another major.minor scikit-learn version than ``trained_with``; warn on a patch.

    Raises
    ------
    ModelVersionError
        Unless ``allow_mismatch`` (then it warns).
    """
    running = sklearn.__version__
    if trained_with == running:
        return
    message = f"the region model was trained with scikit-learn {trained_with}, this is {running}"
    if _minor(trained_with) != _minor(running):
        if not allow_mismatch:
            raise ModelVersionError(
                f"{message}: pickles are not portable across minor versions. Retrain it "
                "(python -m analysis.training.region --out DIR) or install "
                f"scikit-learn=={trained_with}"
            )
        warnings.warn(f"{message}; loading anyway as asked", RuntimeWarning, stacklevel=3)
    else:
        warnings.warn(
            f"{message} (same minor version; should load fine)", RuntimeWarning, stacklevel=3
        )


def _minor(version: str) -> tuple[str, ...]:
    return tuple(version.split(".")[:2])


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _obliquity_deg(affine: np.ndarray) -> float:
    """Angle between the slice normal (cross of the in-plane axes) and the patient's z."""
    normal = np.cross(affine[:3, 1], affine[:3, 2])
    norm = float(np.linalg.norm(normal))
    if norm == 0:
        return 90.0
    return math.degrees(math.acos(min(1.0, abs(float(normal[2])) / norm)))


_CACHE: dict[str, tuple[int, RegionModel]] = {}
_CACHE_LOCK = threading.Lock()


def load_region_model(directory: Path | str | None = None) -> RegionModel:
    """The model in ``directory`` (default: the shipped one), loaded once per process.

    A job worker calls this for every series and gets the same object; the model is
    loaded again only if its ``model.joblib`` changed on disk (retrained in place).
    """
    directory = Path(directory) if directory is not None else DEFAULT_MODEL_DIR
    key = str(directory.resolve())
    model_path = directory / MODEL_FILE
    stamp = model_path.stat().st_mtime_ns if model_path.exists() else 0
    with _CACHE_LOCK:
        cached = _CACHE.get(key)
        if cached is None or cached[0] != stamp:
            _CACHE[key] = (stamp, RegionModel.load(directory))
        return _CACHE[key][1]


# ------------------------------------------------------------------- BodyPartExamined

#: BodyPartExamined defined terms (DICOM PS3.16 Annex L and common scanner values,
#: normalised: upper case, no spaces, underscores or hyphens) -> regions they admit.
_BODY_PARTS: dict[str, frozenset[str]] = {}


def _admit(regions: str, *terms: str) -> None:
    for term in terms:
        _BODY_PARTS[term] = frozenset(regions.split())


_admit(
    "head",
    "HEAD",
    "BRAIN",
    "SKULL",
    "CEREBRUM",
    "CEREBELLUM",
    "FACE",
    "ORBIT",
    "EYE",
    "SINUS",
    "PARANASALSINUS",
    "NOSE",
    "EAR",
    "IAC",
    "TEMPORALBONE",
    "PETROUSBONE",
    "MASTOID",
    "JAW",
    "MANDIBLE",
    "MAXILLA",
    "TMJ",
    "PITUITARY",
    "SELLA",
)
_admit("head chest", "HEADNECK", "NECK", "CSPINE", "CERVICALSPINE", "THYROID", "LARYNX", "PHARYNX")
_admit(
    "chest",
    "CHEST",
    "THORAX",
    "LUNG",
    "LUNGS",
    "HEART",
    "CARDIAC",
    "CORONARY",
    "BREAST",
    "STERNUM",
    "RIB",
    "RIBS",
    "MEDIASTINUM",
    "ESOPHAGUS",
    "TSPINE",
    "THORACICSPINE",
    "SHOULDER",
    "CLAVICLE",
    "SCAPULA",
    "AORTICARCH",
    "THORACICAORTA",
)
_admit("chest abdomen", "CHESTABDOMEN", "CHESTABD", "THORAXABDOMEN", "TLSPINE", "AORTA")
_admit(
    "abdomen",
    "ABDOMEN",
    "ABD",
    "LIVER",
    "PANCREAS",
    "SPLEEN",
    "KIDNEY",
    "KIDNEYS",
    "STOMACH",
    "GALLBLADDER",
    "ADRENAL",
    "LSPINE",
    "LUMBARSPINE",
    "ABDOMINALAORTA",
    "BOWEL",
    "SMALLBOWEL",
)
_admit(
    "abdomen pelvis", "ABDOMENPELVIS", "ABDPELVIS", "ABDPELV", "COLON", "URINARYTRACT", "LSSPINE"
)
_admit(
    "pelvis",
    "PELVIS",
    "HIP",
    "HIPS",
    "BLADDER",
    "PROSTATE",
    "UTERUS",
    "OVARY",
    "RECTUM",
    "SACRUM",
    "SSPINE",
    "COCCYX",
    "SIJOINT",
    "GROIN",
    "FEMUR",
)
_admit("chest abdomen pelvis", "CHESTABDPELVIS", "CHESTABDOMENPELVIS", "CAP", "TRUNK")
#: Terms that say nothing about a single region.
_UNINFORMATIVE = {
    "WHOLEBODY",
    "BODY",
    "SPINE",
    "EXTREMITY",
    "UNKNOWN",
    "OTHER",
    "PHANTOM",
    "ENTIREBODY",
}


def body_part_regions(body_part_examined: str | None) -> frozenset[str] | None:
    """The regions a BodyPartExamined value admits; None when unknown or uninformative."""
    if not body_part_examined:
        return None
    term = re.sub(r"[\s_\-/\\]+", "", str(body_part_examined)).upper()
    if term in _UNINFORMATIVE:
        return None
    return _BODY_PARTS.get(term)


def body_part_contradiction(
    body_part_examined: str | None, prediction: RegionPrediction
) -> str | None:
    """A human-readable flag when the header's BodyPartExamined contradicts the pixels.

    Parameters
    ----------
    body_part_examined
        The DICOM value (e.g. ``"CHEST"``, ``"THORAX"``, ``"HEAD"``, ``"BRAIN"``,
        ``"ABDOMEN"``, ``"PELVIS"``, ``"LUNG"``, ``"SKULL"``, ``"ABDOMENPELVIS"``).
    prediction
        The model's prediction for the series.

    Returns
    -------
    str or None
        The flag; None when they agree, when the prediction is not confident (``other``)
        or when the value is empty, unknown or covers several regions at once
        (``WHOLEBODY``).
    """
    admitted = body_part_regions(body_part_examined)
    if admitted is None or not prediction.confident or prediction.label in admitted:
        return None
    expected = "/".join(r for r in REGIONS if r in admitted)
    return (
        f"BodyPartExamined {str(body_part_examined).strip()!r} ({expected}) contradicts the "
        f"images, which look like {prediction.label} (probability {prediction.probability:.2f})"
    )
