"""The per-image record: which image this is, and the few non-PHI header fields that go with it.

An *image* is one embedded frame of one DICOM instance, so its identity is the pair (SOP Instance
UID, frame). :class:`ImageRecord` is made once, by conversion on the listener host, and is what
the queue payload, the worker, the detector, the store and the verdicts carry; the PNG bytes and
the vector travel beside it, never copied into another class. Its values are UIDs, a frame
number and terms of pipeline/vocabulary.py: no patient data.

In Redis an image is named by :func:`image_key`: the SOP Instance UID alone for frame 0 (so a
single-frame object, nearly every object, keeps the name it always had), ``<sop>/<frame>`` for any
other frame. A SOP Instance UID pacs-embed handles never holds ``/`` (pipeline/uids.py refuses
it), so a key reads back unambiguously (:func:`parse_image_key`).

The instance's state in the ledger stays per SOP Instance UID: it is embedded once every frame
its conversion selected is stored (pipeline/store.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from pipeline.vocabulary import UNKNOWN

#: Between the SOP Instance UID and the frame number in an image key (see the module docstring).
FRAME_SEPARATOR = "/"


def image_key(sop_instance_uid: str, frame: int = 0) -> str:
    """The name of frame ``frame`` of an instance: ``<sop>`` for frame 0, else ``<sop>/<frame>``."""
    return sop_instance_uid if frame == 0 else f"{sop_instance_uid}{FRAME_SEPARATOR}{frame}"


def parse_image_key(key: str) -> tuple[str, int]:
    """(SOP Instance UID, frame) of an :func:`image_key`."""
    sop, separator, frame = key.rpartition(FRAME_SEPARATOR)
    if separator and frame.isdigit():
        return sop, int(frame)
    return key, 0


@dataclass(frozen=True, kw_only=True)
class ImageRecord:
    """One image: its identity (SOP Instance UID, frame) and its instance's non-PHI header fields.

    ``modality`` is a valid Code String or ""; ``body_part`` and ``view`` are vocabulary terms or
    ``UNKNOWN`` (pipeline/vocabulary.py), never the header's raw text.
    """

    sop_instance_uid: str
    frame: int = 0  # 0-based, within the instance
    study_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str = ""
    modality: str = ""
    body_part: str = UNKNOWN
    view: str = UNKNOWN

    @property
    def key(self) -> str:
        """The image's name in Redis (:func:`image_key`)."""
        return image_key(self.sop_instance_uid, self.frame)

    def at_frame(self, frame: int) -> ImageRecord:
        """The record of another frame of the same instance."""
        return replace(self, frame=frame)

    def to_dict(self) -> dict[str, Any]:
        """Plain values, for JSON and the queue payload."""
        return asdict(self)

    def instance_fields(self) -> dict[str, str]:
        """The fields every frame of the instance shares (all but the identity), as text."""
        return {
            name: str(value)
            for name, value in self.to_dict().items()
            if name not in ("sop_instance_uid", "frame")
        }

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> ImageRecord:
        """The record in ``doc`` (a payload item, a stored JSON document), as tolerant as a
        rolling upgrade needs: a field the writer did not know takes its default (``frame`` 0,
        ``view`` UNKNOWN), a field this version does not know is ignored."""
        known = {f.name for f in fields(cls)}
        values = {name: value for name, value in doc.items() if name in known}
        values["frame"] = int(values.get("frame") or 0)
        return cls(**values)
