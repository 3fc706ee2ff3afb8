"""Cohort keys from header fields: vendor spellings normalised, fields configurable."""

from __future__ import annotations

import pytest

from pipeline.detect.cohort import CohortRule
from pipeline.vocabulary import normalise_body_part, normalise_modality


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("CHEST", "CHEST"),
        ("Chest", "CHEST"),
        (" chest ", "CHEST"),
        ("THORAX", "CHEST"),
        ("Thorax PA", "CHEST"),
        ("chest-ap", "CHEST"),
        ("LUNG", "CHEST"),
        ("", "UNKNOWN"),
        (None, "UNKNOWN"),
        ("Brain", "HEAD"),
        ("C-Spine", "CSPINE"),
        ("KNEE", "KNEE"),
        ("left {knee}", "LEFT_KNEE"),
    ],
)
def test_body_part_spellings(raw: str | None, expected: str) -> None:
    """Common vendor spellings of one body part give one cohort name; empty is UNKNOWN."""
    assert normalise_body_part(raw) == expected


def test_site_aliases_win_over_the_built_in_table() -> None:
    """detect.body_part_aliases adds a site's own spellings (keys normalised too)."""
    assert normalise_body_part("Brustkorb", {"brustkorb": "chest"}) == "CHEST"
    assert normalise_body_part("LUNG", {"Lung": "LUNGS_ONLY"}) == "LUNGS_ONLY"


def test_modality_is_upper_cased_and_never_empty() -> None:
    """Modality is a defined term: only case and blanks are fixed."""
    assert normalise_modality(" ct") == "CT"
    assert normalise_modality("") == "UNKNOWN"


def test_key_uses_the_configured_fields() -> None:
    """Default cohorts are modality/body part; adding view splits projections."""
    assert CohortRule().key("CR", "Thorax", "PA") == "CR/CHEST"
    by_view = CohortRule(fields=("modality", "body_part", "view"))
    assert by_view.key("CR", "Thorax", "Lateral") == "CR/CHEST/LAT"
    assert by_view.key("CR", "Thorax", None) == "CR/CHEST/UNKNOWN"


def test_typed_cohorts_are_normalised_and_checked() -> None:
    """A cohort typed on the command line is normalised; a wrong part count is refused."""
    assert CohortRule().parse("cr/Thorax") == "CR/CHEST"
    with pytest.raises(ValueError, match="modality/body_part"):
        CohortRule().parse("CR")


def test_unknown_fields_are_refused() -> None:
    """Only modality, body_part and view can make a cohort."""
    with pytest.raises(ValueError, match="distinct names"):
        CohortRule(fields=("modality", "patient_name"))
