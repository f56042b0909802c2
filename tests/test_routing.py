"""Routing: the first matching route wins; non-images, scouts and our own results never run."""

from __future__ import annotations

import pytest
from pydicom import Dataset

from node.config import DEFAULT_ROUTES, ConfigError, Route, Settings, load_settings
from node.workflow.routing import (
    SeriesFacts,
    choose_route,
    facts_from_datasets,
    is_image_sop_class,
)

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
SEG = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
GSPS = "1.2.840.10008.5.1.4.1.1.11.1"


def ct(**changes: object) -> SeriesFacts:
    base = dict(series_instance_uid="1.2.3", modality="CT", body_part="CHEST",
                series_description="Thorax 1.0 B31f", sop_classes=frozenset({CT_IMAGE}),
                calling_aes=frozenset({"CT_SCANNER"}), instances=120,
                image_types=frozenset({"ORIGINAL", "PRIMARY", "AXIAL"}))
    base.update(changes)
    return SeriesFacts(**base)  # type: ignore[arg-type]


ROUTES = [
    Route.model_validate({"name": "lungs-only-from-er", "pipeline": "ct-body-lungs",
                          "match": {"calling_ae": "ER_CT", "series_description": "thorax"}}),
    Route.model_validate({"name": "big-ct", "pipeline": "ct-body",
                          "match": {"modality": ["CT"], "min_instances": 50}}),
]


def test_image_sop_classes() -> None:
    assert is_image_sop_class(CT_IMAGE) and is_image_sop_class(MR_IMAGE)
    assert not is_image_sop_class(SEG)
    assert not is_image_sop_class(COMPREHENSIVE_3D_SR)
    assert not is_image_sop_class(GSPS)


def test_default_route_takes_ct_images() -> None:
    decision = choose_route(ct(), DEFAULT_ROUTES)
    assert decision.route is not None and decision.route.pipeline == "ct-body-lungs"
    mr = choose_route(ct(modality="MR", sop_classes=frozenset({MR_IMAGE})), DEFAULT_ROUTES)
    assert mr.skipped and mr.reason == "no route matched (ct: modality MR)"


@pytest.mark.parametrize(
    ("facts", "reason"),
    [
        (ct(modality="SEG", sop_classes=frozenset({SEG})), "modality SEG holds no images"),
        (ct(modality="SR", sop_classes=frozenset({COMPREHENSIVE_3D_SR})), "modality SR"),
        (ct(modality="CT", sop_classes=frozenset({CT_IMAGE, GSPS})), "not an image series"),
        (ct(image_types=frozenset({"ORIGINAL", "PRIMARY", "LOCALIZER"})), "localizer"),
        (ct(ours=True), "one of this node's own results"),
    ],
)
def test_never_analysed(facts: SeriesFacts, reason: str) -> None:
    decision = choose_route(facts, DEFAULT_ROUTES)
    assert decision.skipped
    assert reason in decision.reason


def test_first_match_wins_and_misses_are_explained() -> None:
    er = choose_route(ct(calling_aes=frozenset({"er_ct"})), ROUTES)  # AE match ignores case
    assert er.route is not None and er.route.name == "lungs-only-from-er"
    other = choose_route(ct(), ROUTES)
    assert other.route is not None and other.route.name == "big-ct"
    small = choose_route(ct(instances=10), ROUTES)
    assert small.skipped
    assert small.reason == ("no route matched (lungs-only-from-er: calling AE CT_SCANNER; "
                            "big-ct: 10 instances, fewer than 50)")


def test_series_description_is_a_regex_search() -> None:
    routes = [Route.model_validate({"name": "r", "pipeline": "p",
                                    "match": {"series_description": r"^thorax\b"}})]
    assert not choose_route(ct(), routes).skipped
    assert choose_route(ct(series_description="Abdomen thorax"), routes).skipped


def test_facts_from_headers() -> None:
    first, second = Dataset(), Dataset()
    for ds in (first, second):
        ds.Modality, ds.SOPClassUID, ds.Manufacturer = "CT", CT_IMAGE, "ACME"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    second.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    facts = facts_from_datasets("1.2", [first, second], ["A"])
    assert facts.instances == 2 and facts.calling_aes == {"A"}
    assert "LOCALIZER" in facts.image_types and not facts.ours
    first.Manufacturer = "pacsnode"
    assert facts_from_datasets("1.2", [first]).ours


def test_route_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"routes\.0\.match\.series_description: not a valid"):
        load_settings_from({"routes": [{"name": "r", "pipeline": "p",
                                        "match": {"series_description": "("}}]})
    with pytest.raises(ConfigError, match=r"routes\.0\.destinations: no destination named 'pacs'"):
        load_settings_from({"routes": [{"name": "r", "pipeline": "p", "destinations": ["pacs"]}]})
    with pytest.raises(ConfigError, match=r"routes\.1\.pipeline: no pipeline named 'nope'"):
        Settings(routes=[{"name": "a", "pipeline": "ct-body-lungs"},
                         {"name": "b", "pipeline": "nope"}]).check_pipelines(["ct-body-lungs"])
    settings = load_settings_from({"destinations": [
        {"name": "pacs", "ae_title": "PACS", "host": "h", "port": 104},
        {"name": "archive", "ae_title": "ARCH", "host": "h", "port": 105}]})
    assert settings.route_destinations(settings.routes[0]) == ["pacs", "archive"]


def load_settings_from(data: dict[str, object]) -> Settings:
    import tempfile

    import yaml

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as handle:
        yaml.safe_dump(data, handle)
    return load_settings(handle.name)
