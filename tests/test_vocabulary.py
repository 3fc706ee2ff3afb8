"""Header fields that leave the listener host are reduced to known terms, never raw text."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from pipeline.convert import ConvertOptions, convert_file
from pipeline.convert.fields import check_embeddable, record_of
from pipeline.errors import ConversionError, NotEmbeddedError
from pipeline.vocabulary import UNKNOWN, body_part_term, modality_code
from tests import factory

OVERRUN = "CT\x08\x00\x10\x00PN\x0a\x00DOE^JANE^X\x10\x00\x20\x00LO\x08\x00PID-4711"


@pytest.mark.parametrize(
    ("raw", "code"), [("CT", "CT"), (" MR ", "MR"), ("ct", ""), (OVERRUN, ""), ("A" * 17, "")]
)
def test_modality_must_be_a_code_string(raw: str, code: str) -> None:
    """A Modality is kept only as a valid CS of at most 16 characters."""
    assert modality_code(raw) == code


@pytest.mark.parametrize(
    ("raw", "term"),
    [
        *[("Chest", "CHEST"), ("THORAX PA", "CHEST"), ("knee", "KNEE"), ("", UNKNOWN)],
        *[("DOE^JANE^X 19230405", UNKNOWN), (OVERRUN, UNKNOWN), ("BRUST", "CHEST")],
    ],
)
def test_body_part_is_a_known_term_or_unknown(raw: str, term: str) -> None:
    """Body Part Examined normalises to CID 4031 (or a site alias), else UNKNOWN."""
    assert body_part_term(raw, {"Brust": "CHEST"}) == term


def _ct(tmp_path: Path, **fields: str) -> Path:
    ds = factory.ct_slice(study_uid="1.2.5", series_uid="1.2.5.1", instance_number=1, rows=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for keyword, value in fields.items():
            setattr(ds, keyword, value)
        return factory.write(ds, tmp_path / "ct.dcm")


def test_an_overrun_modality_never_leaves_the_host(tmp_path: Path) -> None:
    """The PHI-carrying Modality of the issue-8 probe makes the object skipped, naming no value."""
    with pytest.raises(NotEmbeddedError, match="Modality missing or not a valid code") as info:
        convert_file(_ct(tmp_path, Modality=OVERRUN, BodyPartExamined="DOE^JANE"))
    assert "DOE" not in str(info.value)


@pytest.mark.parametrize("series", ["1.2.3/../4", "1.2.3\\4.5.6", "1.2." + "3" * 70, "1.2.\x013"])
def test_an_unusable_series_uid_is_a_conversion_error(tmp_path: Path, series: str) -> None:
    """Multi-valued, over-long, path-like or control-character Series UIDs quarantine."""
    with pytest.raises(ConversionError, match="Series Instance UID is"):
        convert_file(_ct(tmp_path, SeriesInstanceUID=series))


def test_non_image_modalities_and_classes_are_skipped() -> None:
    """SEG/RTDOSE by Modality, and a Parametric Map under Modality MR, are not embedded."""
    options = ConvertOptions()
    ds = factory.ct_slice(study_uid="1.2", series_uid="1.3", instance_number=1, rows=8)
    ds.Modality = "SEG"
    with pytest.raises(NotEmbeddedError, match="Modality SEG"):
        check_embeddable(record_of(ds, options), options)
    ds.Modality, ds.SOPClassUID = "MR", "1.2.840.10008.5.1.4.1.1.30"
    with pytest.raises(NotEmbeddedError, match=r"SOP Class 1\.2\.840\.10008\.5\.1\.4\.1\.1\.30 "):
        check_embeddable(record_of(ds, options), options)
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    check_embeddable(record_of(ds, options), options)
