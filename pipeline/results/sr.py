"""The Comprehensive SR of one study version: a TID 1500 Measurement Report of every verdict.

Content tree (codes in pipeline/results/codes.py)::

    Imaging Measurement Report (TID 1500)
      language, device observer "pacs-embed" (TID 1001/1004), procedure: Imaging procedure
      Imaging Measurements
        Measurement Group (TID 1501), one per image (instance, frame), in source order:
          tracking identifier "image <SOP UID>[ frame <n>]" + a derived tracking UID
          algorithm (TID 4019): MedImageInsight, its version, parameters: pacs-embed version,
            cohort, state, alpha, k, reference size and version, reason
          Outlier score, Conformal p-value (NUM, when finite), Outlier (Yes/No),
          Predicted label, Header label (private codes), Label mismatch (Yes/No, when checked)
          Source of Measurement: the image (with its 1-based frame number when multi-frame)
        Measurement Group per series ("series <UID>"): Outlier, Label mismatch, the counts,
          Minimum p-value; its images as sources
        Measurement Group for the study ("study <UID>"): the same; no source list, which
          TID 1501 reads as "every image of the document"

Sources without a verdict (skipped: not an image we embed; failed: never embedded) are listed
in the Current Requested Procedure Evidence Sequence (the report covers the study as received)
but get no measurement group: no measurement was made, and a group of "not available" values
would read as a result. A NaN p-value (the cohort's reference is still bootstrapping) or score
is left out rather than encoded: highdicom's NUM item needs a value, and an absent item is what
TID 300 means by "not measured".
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import datetime

import pydicom
from highdicom.sr import (
    AlgorithmIdentification,
    ComprehensiveSR,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    QualitativeEvaluation,
    SourceImageForMeasurementGroup,
    TrackingIdentifier,
)
from pydicom.sr.coding import Code

from pipeline.results import codes
from pipeline.results.identity import (
    MANUFACTURER,
    SR_KIND,
    SR_SERIES_NUMBER,
    Algorithm,
    Reference,
    ResultIdentity,
    device_observer,
    software_versions,
)
from pipeline.results.sources import (
    evidence,
    finish,
    frame_numbers,
    index_sources,
    number_of_frames,
    patient_study_head,
    source_of,
    verdicts_by_instance,
)
from pipeline.uids import derived_uid, loggable
from pipeline.verdicts import GroupVerdict, InstanceVerdict

SERIES_DESCRIPTION = "pacs-embed verdicts"


def build_report(
    sources: Sequence[pydicom.Dataset],
    verdicts: Sequence[InstanceVerdict],
    study: GroupVerdict,
    *,
    identity: ResultIdentity,
    algorithm: Algorithm,
    predecessor: Reference | None,
    now: datetime,
) -> ComprehensiveSR:
    """The SR of ``identity``'s study version (module docstring), a pure function of its inputs.

    ``sources`` are the study's instance headers (pixel data not needed); ``verdicts`` the image
    verdicts, each of an instance among them; ``study`` the study verdict with its series;
    ``predecessor`` the previous version's SR, if one was made. Raises ValueError on inputs that
    do not fit together (another study, a verdict without its source, a frame out of range).
    """
    if study.uid != identity.study_instance_uid:
        raise ValueError(f"study verdict of {loggable(study.uid)}, not of the identity's study")
    by_sop = index_sources(sources, identity.study_instance_uid)
    per_sop = verdicts_by_instance(verdicts, by_sop)
    groups = [
        _image_group(v, by_sop[sop], algorithm) for sop in by_sop for v in per_sop.get(sop, [])
    ]
    groups += [_series_group(s, by_sop, per_sop, algorithm) for s in study.series]
    whole = _group_verdict_group(f"study {study.uid}", study, algorithm, sources=None)
    content = _report([*groups, whole])
    head = patient_study_head(by_sop)
    previous = [_reference_dataset(predecessor)] if predecessor is not None else None
    # highdicom copies, re-parses and searches the whole content tree when it makes the document
    # (seconds for a 200-image study, which delay the push). It gets the report with the study
    # group only, and the document then takes the full tree, built by the same highdicom
    # classes; the evidence lists every source either way.
    report = ComprehensiveSR(
        evidence=evidence(head, list(by_sop.values())),
        content=_report([whole]),
        series_instance_uid=identity.series_uid(SR_KIND),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=identity.sop_instance_uid(SR_KIND),
        instance_number=identity.version,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=MANUFACTURER,
        series_description=SERIES_DESCRIPTION,
        is_complete=True,
        previous_versions=previous,
        coding_schemes=[codes.scheme_identification()],
    )
    report.ContentSequence = content[0].ContentSequence
    report.add_new("SoftwareVersions", "LO", software_versions(algorithm))
    finish(report, source_of(head, by_sop), now)
    return report


def _report(groups: Sequence[MeasurementsAndQualitativeEvaluations]) -> MeasurementReport:
    return MeasurementReport(
        observation_context=ObservationContext(observer_device_context=device_observer()),
        procedure_reported=codes.IMAGING_PROCEDURE,
        imaging_measurements=groups,
        title=codes.MEASUREMENT_REPORT,
    )


def _algorithm_id(algorithm: Algorithm, *parameters: str) -> AlgorithmIdentification:
    return AlgorithmIdentification(
        name=algorithm.model_name,
        version=algorithm.model_version,
        parameters=[f"{MANUFACTURER} {algorithm.software_version}", *parameters],
    )


def _tracking(text: str, *parts: str) -> TrackingIdentifier:
    """A human-readable identifier and a UID derived from what is tracked (stable across
    versions, so a reader can follow one image's verdict from one version to the next)."""
    return TrackingIdentifier(uid=derived_uid("tracking", *parts), identifier=text)


def _number(name: Code, value: float, unit: Code) -> Measurement:
    return Measurement(name=name, value=value, unit=unit)


def _evaluation(name: Code, value: Code) -> QualitativeEvaluation:
    return QualitativeEvaluation(name=name, value=value)


def _source_images(ds: pydicom.Dataset, frames: Sequence[int]) -> SourceImageForMeasurementGroup:
    return SourceImageForMeasurementGroup(
        referenced_sop_class_uid=str(ds.SOPClassUID),
        referenced_sop_instance_uid=str(ds.SOPInstanceUID),
        referenced_frame_numbers=frame_numbers(ds, frames),
    )


def _image_group(
    v: InstanceVerdict, source: pydicom.Dataset, algorithm: Algorithm
) -> MeasurementsAndQualitativeEvaluations:
    """One image's verdict (module docstring)."""
    sop, frame = v.image.sop_instance_uid, v.image.frame
    text = f"image {sop}" + (f" frame {frame + 1}" if number_of_frames(source) > 1 else "")
    parameters = [
        f"cohort={v.cohort}",
        f"state={v.state}",
        f"alpha={v.alpha:g}",
        f"k={v.k}",
        f"reference_size={v.reference_size}",
        f"reference_version={v.reference_version}",
        *([f"reason={v.reason}"] if v.reason else []),
    ]
    measurements = [
        _number(name, value, codes.NO_UNITS)
        for name, value in ((codes.OUTLIER_SCORE, v.score), (codes.P_VALUE, v.p_value))
        if math.isfinite(value)
    ]
    evaluations = [_evaluation(codes.OUTLIER, codes.yes_no(v.outlier))]
    if v.label is not None:
        for name, term in (
            (codes.PREDICTED_LABEL, v.label.predicted_label),
            (codes.HEADER_LABEL, v.label.header_label),
        ):
            if term:
                evaluations.append(_evaluation(name, codes.label(term)))
        if v.label.checked:  # an unchecked label has no verdict: "No" would claim one
            evaluations.append(_evaluation(codes.LABEL_MISMATCH, codes.yes_no(v.label.mismatch)))
    return MeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(text, "image", sop, str(frame)),
        algorithm_id=_algorithm_id(algorithm, *parameters),
        measurements=measurements,
        qualitative_evaluations=evaluations,
        source_images=[_source_images(source, [frame])],
    )


def _series_group(
    series: GroupVerdict,
    by_sop: Mapping[str, pydicom.Dataset],
    per_sop: Mapping[str, list[InstanceVerdict]],
    algorithm: Algorithm,
) -> MeasurementsAndQualitativeEvaluations:
    """A series verdict, its images as the group's sources."""
    images = [
        _source_images(by_sop[sop], [v.image.frame for v in items])
        for sop, items in per_sop.items()
        if items[0].image.series_instance_uid == series.uid
    ]
    if not images:
        raise ValueError(f"series verdict of {loggable(series.uid)} without image verdicts")
    return _group_verdict_group(f"series {series.uid}", series, algorithm, sources=images)


def _group_verdict_group(
    text: str,
    group: GroupVerdict,
    algorithm: Algorithm,
    *,
    sources: Sequence[SourceImageForMeasurementGroup] | None,
) -> MeasurementsAndQualitativeEvaluations:
    """A series' or the study's verdict: its flags, counts and smallest p-value."""
    counts = (
        (codes.IMAGES, group.images),
        (codes.SCORED_IMAGES, group.scored),
        (codes.OUTLIER_IMAGES, group.outlier_instances),
        (codes.LABEL_CHECKED, group.label_checked),
        (codes.LABEL_MISMATCHES, group.label_mismatches),
    )
    measurements = [_number(name, count, codes.IMAGES_UNIT) for name, count in counts]
    if math.isfinite(group.min_p_value):
        measurements.append(_number(codes.MIN_P_VALUE, group.min_p_value, codes.NO_UNITS))
    evaluations = [_evaluation(codes.OUTLIER, codes.yes_no(group.outlier))]
    if group.label_checked:
        evaluations.append(_evaluation(codes.LABEL_MISMATCH, codes.yes_no(group.label_mismatch)))
    kind, _, uid = text.partition(" ")
    return MeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(text, kind, uid),
        algorithm_id=_algorithm_id(algorithm),
        measurements=measurements,
        qualitative_evaluations=evaluations,
        source_images=sources,
    )


def _reference_dataset(reference: Reference) -> pydicom.Dataset:
    """The four UIDs highdicom's Predecessor Documents Sequence is made from."""
    ds = pydicom.Dataset()
    ds.StudyInstanceUID = reference.study_instance_uid
    ds.SeriesInstanceUID = reference.series_instance_uid
    ds.SOPInstanceUID = reference.sop_instance_uid
    ds.SOPClassUID = reference.sop_class_uid
    return ds
