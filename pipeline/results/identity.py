"""Who made a result and what it is called: value objects the builders are handed.

A result object's UIDs are derived, never generated: the SR and the KOS of one study version are
named by (study UID, version, kind) through :func:`pipeline.uids.derived_uid`, so a push redone
after a crash re-sends the very same instances and the PACS keeps one copy of each.

Each kind lives in one series per study whatever the version (the series UID leaves the version
out): the PACS shows one "pacs-embed verdicts" series whose instances are the versions, numbered
by Instance Number = version, the newest on top.
"""

from __future__ import annotations

from dataclasses import dataclass

from highdicom.sr import DeviceObserverIdentifyingAttributes, ObserverContext
from pydicom.sr.codedict import codes
from pydicom.uid import ComprehensiveSRStorage, KeyObjectSelectionDocumentStorage

from pipeline.uids import derived_uid

#: Series Numbers of our own series, far above what modalities use so they sort last.
SR_SERIES_NUMBER = 9901
KOS_SERIES_NUMBER = 9902

#: Equipment module values of every object pacs-embed creates.
MANUFACTURER = "pacs-embed"

#: The kinds of result object, as they enter the UID derivation (never rename: UIDs would change).
SR_KIND, KOS_KIND = "sr", "kos"

#: UID of the device observer (TID 1004) that pacs-embed is in every report.
DEVICE_UID = derived_uid("device")


@dataclass(frozen=True, kw_only=True)
class Algorithm:
    """What made the verdicts: the model (name, deployment/version from the configuration) and
    the pacs-embed version that scored them (it decides alpha, k and the aggregation rules)."""

    model_name: str = "MedImageInsight"
    model_version: str
    software_version: str


def software_versions(algorithm: Algorithm) -> list[str]:
    """Software Versions of the equipment module: ours and the model's (a list: pydicom refuses
    a tuple, the type highdicom's argument declares, hence set after construction)."""
    return [
        f"{MANUFACTURER} {algorithm.software_version}",
        f"{algorithm.model_name} {algorithm.model_version}",
    ]


def device_observer() -> ObserverContext:
    """pacs-embed as the observer (TID 1002/1004): the objects are a machine's, unverified."""
    device = DeviceObserverIdentifyingAttributes(
        uid=DEVICE_UID, name=MANUFACTURER, manufacturer_name=MANUFACTURER
    )
    return ObserverContext(observer_type=codes.DCM.Device, observer_identifying_attributes=device)


@dataclass(frozen=True)
class Reference:
    """An instance the builders point at without holding its header: a previous SR version."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str = ComprehensiveSRStorage


@dataclass(frozen=True)
class ResultIdentity:
    """The names of one study version's result objects (see the module docstring)."""

    study_instance_uid: str
    version: int

    def __post_init__(self) -> None:
        if self.version < 1:
            raise ValueError(
                f"version must be 1 or more (it is the Instance Number): {self.version}"
            )

    def series_uid(self, kind: str) -> str:
        """The Series Instance UID of ``kind`` (``sr`` or ``kos``) in this study, every version."""
        return derived_uid("result-series", self.study_instance_uid, _checked(kind))

    def sop_instance_uid(self, kind: str) -> str:
        """The SOP Instance UID of ``kind`` for this study version."""
        return derived_uid("result", self.study_instance_uid, str(self.version), _checked(kind))

    @property
    def sr(self) -> Reference:
        """This version's SR, as a later version's predecessor reference."""
        return Reference(
            self.study_instance_uid, self.series_uid(SR_KIND), self.sop_instance_uid(SR_KIND)
        )

    @property
    def kos(self) -> Reference:
        """This version's KOS (if one was made: only when something is flagged)."""
        return Reference(
            self.study_instance_uid,
            self.series_uid(KOS_KIND),
            self.sop_instance_uid(KOS_KIND),
            KeyObjectSelectionDocumentStorage,
        )

    def previous(self) -> ResultIdentity | None:
        """The identity of the version before this one (None for version 1)."""
        return (
            ResultIdentity(self.study_instance_uid, self.version - 1) if self.version > 1 else None
        )


def _checked(kind: str) -> str:
    if kind not in (SR_KIND, KOS_KIND):
        raise ValueError(f"unknown result kind {kind!r} (expected {SR_KIND!r} or {KOS_KIND!r})")
    return kind
