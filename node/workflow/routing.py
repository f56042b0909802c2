"""Decide what happens to a series: which route (pipeline, destinations), or why none.

Pure decisions on :class:`SeriesFacts`; gathering the facts from the database and the
files is :mod:`node.workflow.jobs`'s job, so the offline ``pacsnode analyze`` and the node
decide the same way.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pydicom import Dataset
from pydicom.uid import UID

from node.config import Route

#: The Manufacturer our results carry (see node/results.py).
OUR_MANUFACTURER = "pacsnode"

#: Modalities that never hold images to analyse, whatever their SOP class says.
NON_IMAGE_MODALITIES = frozenset(
    {"SEG", "SR", "PR", "KO", "RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD",
     "REG", "DOC", "PLAN", "FID", "RWV", "AU", "ECG", "HD", "RESP"}
)


@dataclass(frozen=True)
class SeriesFacts:
    """What routing looks at; built from the database and a few instance headers."""

    series_instance_uid: str
    modality: str = ""
    body_part: str = ""
    series_description: str = ""
    sop_classes: frozenset[str] = frozenset()
    calling_aes: frozenset[str] = frozenset()
    instances: int = 0
    image_types: frozenset[str] = frozenset()
    manufacturer: str = ""
    ours: bool = False  # one of our own result series, sent back to us
    #: The region model's reading of the pixels; ``None`` until a worker has run it.
    predicted_region: str | None = None


@dataclass(frozen=True)
class RouteDecision:
    """The route to take, or ``None`` with the reason the series is skipped.

    ``pending`` means the decision needs the predicted region, which only a worker
    that has the pixels can give: the series is queued and routed there.
    """

    route: Route | None
    reason: str
    pending: bool = False

    @property
    def skipped(self) -> bool:
        return self.route is None and not self.pending


class _NeedsRegion(Exception):
    """A route's match depends on the predicted region, which is not known yet."""


def is_image_sop_class(uid: str) -> bool:
    """True for image storage SOP classes (CT, MR, ...), false for SEG, SR, PR, KO, RT."""
    name = UID(uid).name
    return "Image Storage" in name and "Presentation State" not in name


def facts_from_datasets(
    series_uid: str, datasets: Sequence[Dataset], calling_aes: Iterable[str] = ()
) -> SeriesFacts:
    """Facts from the headers of (some of) a series' instances."""
    first = datasets[0] if datasets else Dataset()
    image_types: set[str] = set()
    for ds in datasets:
        image_types.update(str(value).upper() for value in ds.get("ImageType", []) or [])
    manufacturer = str(first.get("Manufacturer", "") or "")
    return SeriesFacts(
        series_instance_uid=series_uid,
        modality=str(first.get("Modality", "") or ""),
        body_part=str(first.get("BodyPartExamined", "") or ""),
        series_description=str(first.get("SeriesDescription", "") or ""),
        sop_classes=frozenset(str(ds.get("SOPClassUID", "")) for ds in datasets),
        calling_aes=frozenset(calling_aes),
        instances=len(datasets),
        image_types=frozenset(image_types),
        manufacturer=manufacturer,
        ours=manufacturer == OUR_MANUFACTURER,
    )


def never_analysed(facts: SeriesFacts) -> str | None:
    """The reason a series is never analysed as images, whatever the routes say."""
    if facts.ours:
        return "one of this node's own results"
    if facts.modality.upper() in NON_IMAGE_MODALITIES:
        return f"modality {facts.modality} holds no images to analyse"
    non_images = sorted(uid for uid in facts.sop_classes if not is_image_sop_class(uid))
    if non_images:
        return f"not an image series (SOP class {UID(non_images[0]).name or non_images[0]})"
    if "LOCALIZER" in facts.image_types:
        return "a localizer (scout) series"
    return None


def _one_of(value: str, allowed: list[str] | None) -> bool:
    return allowed is None or value.upper() in {item.upper() for item in allowed}


def _mismatch(facts: SeriesFacts, route: Route) -> str | None:
    match = route.match
    if not _one_of(facts.modality, match.modality):
        return f"modality {facts.modality or '(none)'}"
    if not _one_of(facts.body_part, match.body_part):
        return f"body part {facts.body_part or '(none)'}"
    if match.sop_class is not None and not facts.sop_classes & set(match.sop_class):
        return "SOP class"
    if match.series_description is not None and not re.search(
        match.series_description, facts.series_description, re.IGNORECASE
    ):
        return f"series description {facts.series_description!r}"
    if match.calling_ae is not None and not {
        ae.upper() for ae in facts.calling_aes
    } & {ae.upper() for ae in match.calling_ae}:
        return f"calling AE {', '.join(sorted(facts.calling_aes)) or '(none)'}"
    if facts.instances < match.min_instances:
        return f"{facts.instances} instances, fewer than {match.min_instances}"
    if match.predicted_region is not None:
        if facts.predicted_region is None:
            raise _NeedsRegion()
        if facts.predicted_region not in match.predicted_region:
            return f"predicted region {facts.predicted_region}"
    return None


def choose_route(facts: SeriesFacts, routes: Sequence[Route]) -> RouteDecision:
    """The first route that matches wins; otherwise the series is skipped with reasons."""
    if reason := never_analysed(facts):
        return RouteDecision(None, reason)
    misses = []
    for route in routes:
        try:
            why_not = _mismatch(facts, route)
        except _NeedsRegion:
            # Routes are ordered: this one must be decided before any later one.
            return RouteDecision(None, f"route {route.name} needs the predicted region",
                                 pending=True)
        if why_not is None:
            return RouteDecision(route, f"matched route {route.name}")
        misses.append(f"{route.name}: {why_not}")
    if not routes:
        return RouteDecision(None, "no routes are configured")
    return RouteDecision(None, "no route matched (" + "; ".join(misses) + ")")
