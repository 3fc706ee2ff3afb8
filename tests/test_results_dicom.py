"""The result objects (pipeline/results): the SR and the KOS of a study version, built from
factory headers and hand-made verdicts, read back with pydicom and checked with dciodvfy."""

from __future__ import annotations

import logging
import math
import shutil
import subprocess
import uuid
import warnings
from collections.abc import Iterator
from datetime import datetime
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from structlog.testing import capture_logs

from pipeline.records import ImageRecord
from pipeline.results import Algorithm, ResultIdentity, build_kos, build_report
from pipeline.uids import derived_uid, is_valid_uid
from pipeline.verdicts import (
    BOOTSTRAP,
    SCORED,
    GroupVerdict,
    InstanceVerdict,
    LabelVerdict,
    series_verdict,
    study_verdict,
)
from tests import factory

NOW = datetime(2024, 3, 15, 12, 30, 45)
ALGORITHM = Algorithm(model_version="medimageinsight-v1.0.0", software_version="0.1.0")
PATIENT_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
)


def verdict(
    ds: pydicom.Dataset,
    frame: int = 0,
    *,
    score: float = 0.2,
    p: float = 0.4,
    outlier: bool = False,
    label: LabelVerdict | None = None,
    state: str = SCORED,
) -> InstanceVerdict:
    record = ImageRecord(
        sop_instance_uid=ds.SOPInstanceUID,
        frame=frame,
        study_instance_uid=ds.StudyInstanceUID,
        series_instance_uid=ds.SeriesInstanceUID,
        sop_class_uid=ds.SOPClassUID,
        modality=ds.Modality,
    )
    return InstanceVerdict(
        image=record,
        cohort=f"{ds.Modality}/CHEST",
        state=state,
        score=score,
        p_value=p,
        alpha=0.01,
        k=5,
        reference_size=200,
        reference_version=3,
        outlier=outlier,
        label=label,
    )


def mismatch(header: str, predicted: str) -> LabelVerdict:
    return LabelVerdict(header, predicted, {header: 0.1, predicted: 0.9}, 0.2, True, True)


class Study:
    """A CT series of 4 (one outlier, one bootstrapping, one without a verdict), a CR whose
    label mismatches, a 5-frame US with frames 0, 2, 4 embedded (frame 2 an outlier) and a Basic
    Text SR that was skipped, all in one study."""

    def __init__(self) -> None:
        self.ct = factory.ct_series(4, rows=32, columns=32, identical=None)
        self.uid = str(self.ct[0].StudyInstanceUID)
        self.cr = factory.mono1_cr(rows=32, columns=32)
        self.us = factory.mono_multiframe(frames=5, rows=16, columns=16)
        self.text = factory.basic_text_sr()
        for ds in (self.cr, self.us, self.text):
            ds.StudyInstanceUID = self.uid
        self.sources = [*self.ct, self.cr, self.us, self.text]
        self.verdicts = [
            verdict(self.ct[0]),
            verdict(self.ct[1], score=0.9, p=0.004, outlier=True),
            verdict(self.ct[2], p=math.nan, state=BOOTSTRAP),
            verdict(self.cr, label=mismatch("XR/CHEST", "XR/ABDOMEN")),
            verdict(self.us, 0),
            verdict(self.us, 2, score=0.8, p=0.005, outlier=True),
            verdict(self.us, 4),
        ]

    def study_verdict(self, verdicts: list[InstanceVerdict] | None = None) -> GroupVerdict:
        items = self.verdicts if verdicts is None else verdicts
        series: dict[str, list[InstanceVerdict]] = {}
        for v in items:
            series.setdefault(v.image.series_instance_uid, []).append(v)
        return study_verdict(self.uid, [series_verdict(uid, vs) for uid, vs in series.items()])

    def report(self, version: int = 1) -> pydicom.Dataset:
        identity = ResultIdentity(self.uid, version)
        previous = identity.previous()
        return build_report(
            self.sources,
            self.verdicts,
            self.study_verdict(),
            identity=identity,
            algorithm=ALGORITHM,
            predecessor=previous.sr if previous else None,
            now=NOW,
        )

    def kos(self, version: int = 1) -> pydicom.Dataset:
        kos = build_kos(
            self.sources,
            self.verdicts,
            identity=ResultIdentity(self.uid, version),
            algorithm=ALGORITHM,
            now=NOW,
        )
        assert kos is not None
        return kos


@pytest.fixture
def study() -> Study:
    return Study()


def items(node: pydicom.Dataset) -> Iterator[pydicom.Dataset]:
    """Every content item under ``node``, depth first."""
    for item in node.get("ContentSequence", []):
        yield item
        yield from items(item)


def meaning(item: pydicom.Dataset) -> str:
    return str(item.ConceptNameCodeSequence[0].CodeMeaning)


def groups(sr: pydicom.Dataset) -> dict[str, pydicom.Dataset]:
    """Measurement groups by their tracking identifier text."""
    found = {}
    for item in items(sr):
        if item.ValueType == "CONTAINER" and meaning(item) == "Measurement Group":
            ids = [i.TextValue for i in item.ContentSequence if meaning(i) == "Tracking Identifier"]
            found[ids[0]] = item
    return found


def values(group: pydicom.Dataset) -> dict[str, object]:
    """The group's direct NUM and CODE values by concept meaning."""
    out: dict[str, object] = {}
    for item in group.ContentSequence:
        if item.ValueType == "NUM":
            out[meaning(item)] = float(item.MeasuredValueSequence[0].NumericValue)
        elif item.ValueType == "CODE":
            out[meaning(item)] = str(item.ConceptCodeSequence[0].CodeMeaning)
    return out


def image_refs(node: pydicom.Dataset) -> list[tuple[str, tuple[int, ...]]]:
    """(SOP Instance UID, frame numbers) of the IMAGE items directly under ``node``."""
    out = []
    for item in node.ContentSequence:
        if item.ValueType == "IMAGE":
            ref = item.ReferencedSOPSequence[0]
            numbers = ref.get("ReferencedFrameNumber")
            if numbers is None:
                numbers = []
            elif not isinstance(numbers, list | pydicom.multival.MultiValue):
                numbers = [numbers]
            out.append((str(ref.ReferencedSOPInstanceUID), tuple(int(f) for f in numbers)))
    return out


def evidence_uids(ds: pydicom.Dataset) -> set[str]:
    return {
        str(sop.ReferencedSOPInstanceUID)
        for study in ds.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for sop in series.ReferencedSOPSequence
    }


def encoded(ds: pydicom.Dataset) -> bytes:
    out = BytesIO()
    pydicom.dcmwrite(out, ds, enforce_file_format=True)
    return out.getvalue()


def test_report_references_every_source_instance_and_frame(study: Study) -> None:
    """Every source is evidence (skipped and failed ones too); every image verdict's image is
    referenced with its 1-based frame when multi-frame."""
    sr = study.report()
    assert evidence_uids(sr) == {str(ds.SOPInstanceUID) for ds in study.sources}
    referenced = {ref for group in groups(sr).values() for ref in image_refs(group)}
    us = str(study.us.SOPInstanceUID)
    assert {(us, (1,)), (us, (3,)), (us, (5,))} <= referenced
    assert (str(study.ct[1].SOPInstanceUID), ()) in referenced
    assert not any(sop == str(study.ct[3].SOPInstanceUID) for sop, _ in referenced)


def test_one_group_per_image_with_outlier_score_p_value_and_label(study: Study) -> None:
    """Each image verdict is one group: Outlier Yes/No, score, p-value (left out when NaN),
    the label check; a source without a verdict has none."""
    found = groups(study.report())
    images = {k: v for k, v in found.items() if k.startswith("image ")}
    assert len(images) == len(study.verdicts)
    flagged = values(images[f"image {study.ct[1].SOPInstanceUID}"])
    assert flagged["Outlier"] == "Yes"
    assert flagged["Outlier score"] == pytest.approx(0.9)
    assert flagged["Conformal p-value"] == pytest.approx(0.004)
    bootstrap = values(images[f"image {study.ct[2].SOPInstanceUID}"])
    assert "Conformal p-value" not in bootstrap and bootstrap["Outlier"] == "No"
    assert bootstrap["Outlier score"] == pytest.approx(0.2)
    cr = values(images[f"image {study.cr.SOPInstanceUID}"])
    assert cr["Predicted label"] == "XR/ABDOMEN" and cr["Header label"] == "XR/CHEST"
    assert cr["Label mismatch"] == "Yes"
    assert values(images[f"image {study.us.SOPInstanceUID} frame 3"])["Outlier"] == "Yes"
    assert f"image {study.ct[3].SOPInstanceUID}" not in images


def test_algorithm_identification_names_model_and_pacs_embed(study: Study) -> None:
    """Algorithm name/version from the configuration, pacs-embed's version as a parameter and in
    the equipment module."""
    sr = study.report()
    texts = {(meaning(i), i.TextValue) for i in items(sr) if i.ValueType == "TEXT"}
    assert ("Algorithm Name", "MedImageInsight") in texts
    assert ("Algorithm Version", "medimageinsight-v1.0.0") in texts
    assert ("Algorithm Parameters", "pacs-embed 0.1.0") in texts
    assert sr.Manufacturer == "pacs-embed"
    assert list(sr.SoftwareVersions) == [
        "pacs-embed 0.1.0",
        "MedImageInsight medimageinsight-v1.0.0",
    ]


def test_series_and_study_verdicts_present(study: Study) -> None:
    """One group per series and one for the study, with their flags and counts."""
    found = groups(study.report())
    verdict_ = study.study_verdict()
    for series in verdict_.series:
        got = values(found[f"series {series.uid}"])
        assert got["Outlier"] == ("Yes" if series.outlier else "No")
        assert got["Images"] == series.images
    whole = values(found[f"study {study.uid}"])
    assert whole["Images"] == 7 and whole["Outlier images"] == 2
    # One odd slice in a series is chance at alpha 0.01 (pipeline/verdicts.py): no study outlier.
    assert not verdict_.outlier and whole["Outlier"] == "No"
    assert whole["Label mismatch"] == "Yes"
    assert whole["Minimum p-value"] == pytest.approx(0.004)


def test_version_2_references_its_predecessor(study: Study) -> None:
    """A new version has a new SOP Instance UID in the same series and points at version 1."""
    first, second = study.report(1), study.report(2)
    assert "PredecessorDocumentsSequence" not in first
    assert second.SOPInstanceUID != first.SOPInstanceUID
    assert second.SeriesInstanceUID == first.SeriesInstanceUID
    assert (first.InstanceNumber, second.InstanceNumber) == (1, 2)
    item = second.PredecessorDocumentsSequence[0]
    assert item.StudyInstanceUID == study.uid
    series = item.ReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == first.SeriesInstanceUID
    assert series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == first.SOPInstanceUID


def test_same_inputs_same_objects_and_uids(study: Study) -> None:
    """A redone build is byte for byte the same object: the PACS sees a resend, not a copy."""
    assert encoded(study.report()) == encoded(study.report())
    assert encoded(study.kos()) == encoded(study.kos())
    assert study.kos(1).SOPInstanceUID != study.kos(2).SOPInstanceUID
    identity = ResultIdentity(study.uid, 1)
    assert identity.sop_instance_uid("sr") != identity.sop_instance_uid("kos")
    assert identity.series_uid("sr") != identity.series_uid("kos")
    assert ResultIdentity("1.2.3", 1).sr != ResultIdentity("1.2.4", 1).sr


def test_kos_lists_exactly_the_flagged_images(study: Study) -> None:
    """Titled Quality Issue (never Of Interest); the outlier CT, the mismatched CR and frame 3
    of the US; evidence is exactly those."""
    kos = study.kos()
    title = kos.ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning) == (
        "113010",
        "DCM",
        "Quality Issue",
    )
    assert sorted(image_refs(kos)) == sorted(
        [
            (str(study.ct[1].SOPInstanceUID), ()),
            (str(study.cr.SOPInstanceUID), ()),
            (str(study.us.SOPInstanceUID), (3,)),
        ]
    )
    assert evidence_uids(kos) == {
        str(study.ct[1].SOPInstanceUID),
        str(study.cr.SOPInstanceUID),
        str(study.us.SOPInstanceUID),
    }
    assert (kos.Modality, kos.SeriesNumber, kos.InstanceNumber) == ("KO", 9902, 1)


def test_no_kos_when_nothing_is_flagged(study: Study) -> None:
    """Nothing flagged (and a bootstrapping cohort flags nothing): no KOS at all."""
    calm = [v for v in study.verdicts if not (v.outlier or v.label_mismatch)]
    identity = ResultIdentity(study.uid, 1)
    assert build_kos(study.sources, calm, identity=identity, algorithm=ALGORITHM, now=NOW) is None


@pytest.mark.parametrize("kind", ["sr", "kos"])
def test_patient_and_study_copied_from_the_source(study: Study, kind: str) -> None:
    """Filed in the source study under the same patient, in a series of our own."""
    doc = study.report() if kind == "sr" else study.kos()
    source = study.ct[0]
    for keyword in PATIENT_STUDY:
        assert doc[keyword].value == source[keyword].value, keyword
    assert doc.SeriesInstanceUID not in {ds.SeriesInstanceUID for ds in study.sources}
    assert str(doc.ContentDate) == "20240315" and str(doc.ContentTime).startswith("123045")


def test_no_patient_data_logged_and_sources_untouched(
    study: Study, caplog: pytest.LogCaptureFixture
) -> None:
    """A name without '^' (which highdicom would quote in a warning) reaches the objects
    verbatim and no log line or warning; the caller's headers are not modified."""
    for ds in study.sources:
        ds.PatientName = "Doe Jane"
    del study.cr.PatientSex  # a missing Type 2 attribute must not break the build
    before = [encoded(ds) for ds in study.sources]
    caplog.set_level(logging.DEBUG)
    with capture_logs() as logs, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sr, kos = study.report(), study.kos()
    assert sr.PatientName == "Doe Jane" and kos.PatientName == "Doe Jane"
    said = " ".join([caplog.text, repr(logs), *(str(w.message) for w in caught)])
    assert "Doe" not in said
    assert [encoded(ds) for ds in study.sources] == before


def test_inputs_that_do_not_fit_are_refused(study: Study) -> None:
    """A verdict without its source, a source of another study, version 0: ValueError."""
    stranger = factory.mono1_cr()
    with pytest.raises(ValueError, match="not among the sources"):
        build_kos(
            study.sources,
            [verdict(stranger, outlier=True)],
            identity=ResultIdentity(study.uid, 1),
            algorithm=ALGORITHM,
            now=NOW,
        )
    with pytest.raises(ValueError, match="another study"):
        build_kos(
            [*study.sources, stranger],
            [],
            identity=ResultIdentity(study.uid, 1),
            algorithm=ALGORITHM,
            now=NOW,
        )
    with pytest.raises(ValueError, match="version"):
        ResultIdentity(study.uid, 0)


def test_derived_uid_is_a_conformant_uuid_uid() -> None:
    """2.25 + a version 8 RFC 9562 UUID, a pure function of the parts, parts kept apart."""
    uid = derived_uid("result", "1.2.3", "1", "sr")
    assert uid == derived_uid("result", "1.2.3", "1", "sr")
    assert is_valid_uid(uid) and len(uid) <= 64 and uid.startswith("2.25.")
    parsed = uuid.UUID(int=int(uid.removeprefix("2.25.")))
    assert (parsed.version, parsed.variant) == (8, uuid.RFC_4122)
    assert derived_uid("1.2", "3") != derived_uid("1", ".23")


def dciodvfy_messages(path: Path) -> list[str]:
    """dciodvfy's lines (it writes the IOD name to stdout, findings to stderr)."""
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.strip()]


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) not installed")
@pytest.mark.parametrize("kind", ["sr", "sr-v2", "kos"])
def test_dciodvfy_reports_no_errors(study: Study, kind: str, tmp_path: Path) -> None:
    """Every object we create is valid for dicom3tools' IOD checker (warnings allowed)."""
    doc = {"sr": study.report, "sr-v2": lambda: study.report(2), "kos": study.kos}[kind]()
    path = tmp_path / f"{kind}.dcm"
    pydicom.dcmwrite(path, doc, enforce_file_format=True)
    messages = dciodvfy_messages(path)
    errors = [m for m in messages if m.startswith("Error")]
    # One line per kind of warning: the same one repeats at every path a private code is used.
    warnings_ = sorted({m.rpartition("> - ")[2] for m in messages if m.startswith("Warning")})
    print(f"dciodvfy {kind}: {len(errors)} error(s); warnings: {warnings_}")
    assert errors == [], "\n".join(messages)
