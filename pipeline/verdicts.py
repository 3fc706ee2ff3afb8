"""What the detector says about an image, a series and a study, as plain values.

A leaf below both the detector (which makes verdicts) and the store (which keeps them and
aggregates them when read), so neither imports the other.

Instance verdicts are computed; series and study verdicts are *derived* from the instance
verdicts each time they are read (pure functions below), so a late image, a redone batch or a
retroactive bootstrap flag can never leave an aggregate out of date.

Aggregation rule (also in README "Verdicts"):

* series ``outlier``: its flagged instances are more than chance explains. With m scored images
  and alpha per image, a normal series has Binomial(m, alpha) flags; the series is flagged when
  P(Binomial(m, alpha) >= flags) <= alpha. One image: flagged iff it is. 20 images at alpha 0.01:
  3 flags. A single odd slice in a long CT series flags that instance (and is counted in
  ``outlier_instances``) without flagging the series, which would otherwise flag nearly every
  500-slice series by chance alone.
* series ``label_mismatch``: more than half of its label-checked images mismatch (one series has
  one header label, so a majority is the natural vote).
* study: ``outlier`` / ``label_mismatch`` if any series is; counts are sums; ``min_p_value`` the
  smallest over its images.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from pipeline.records import ImageRecord

#: Verdict states: ``bootstrap`` while the cohort's reference is too small to calibrate
#: (p-value NaN, never flagged), ``scored`` once it is.
BOOTSTRAP, SCORED = "bootstrap", "scored"


@dataclass(frozen=True)
class LabelVerdict:
    """Zero-shot check of the header's label against the picture."""

    header_label: str
    predicted_label: str
    probabilities: Mapping[str, float]
    margin: float
    checked: bool  # the header's label is one of the configured prompts
    mismatch: bool


@dataclass(frozen=True)
class InstanceVerdict:
    """One image's verdict, with everything needed to reproduce or audit it."""

    image: ImageRecord
    cohort: str
    state: str
    score: float  # NaN while the reference is empty
    p_value: float  # NaN while bootstrapping
    alpha: float
    k: int
    reference_size: int
    reference_version: int
    outlier: bool
    reason: str = ""  # why flagged outside the usual rule, e.g. "reference_trim"
    label: LabelVerdict | None = field(default=None)

    @property
    def label_mismatch(self) -> bool:
        return self.label is not None and self.label.mismatch

    def to_json(self) -> dict[str, Any]:
        """JSON-safe dict, the image's record flattened in: NaN becomes null (JSON has no NaN)."""
        doc = {**self.image.to_dict(), **{name: getattr(self, name) for name in _VERDICT_FIELDS}}
        doc["label"] = asdict(self.label) if self.label is not None else None
        for key in ("score", "p_value"):
            doc[key] = _finite_or_none(doc[key])
        return doc

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> InstanceVerdict:
        """Also reads a verdict stored before records carried a frame and a view."""
        values = {name: doc[name] for name in _VERDICT_FIELDS if name in doc}
        for key in ("score", "p_value"):
            values[key] = math.nan if doc.get(key) is None else float(doc[key])
        label = doc.get("label")
        return cls(
            image=ImageRecord.from_dict(doc),
            label=LabelVerdict(**label) if label else None,
            **values,
        )


#: The verdict's own fields, stored beside its image's record.
_VERDICT_FIELDS = tuple(f.name for f in fields(InstanceVerdict) if f.name not in ("image", "label"))


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def binomial_tail(m: int, flags: int, alpha: float) -> float:
    """P(Binomial(m, alpha) >= flags), exact (m is a series' image count: small sums)."""
    if flags <= 0:
        return 1.0
    # Sum the upper tail itself (not 1 - lower: m=1 gives alpha exactly), in log space so that
    # a 3,000-image series neither overflows the binomial coefficient nor underflows a power.
    log_a, log_b = math.log(alpha), math.log1p(-alpha)
    log_m = math.lgamma(m + 1)
    tail = sum(
        math.exp(log_m - math.lgamma(i + 1) - math.lgamma(m - i + 1) + i * log_a + (m - i) * log_b)
        for i in range(flags, m + 1)
    )
    return min(1.0, tail)


@dataclass(frozen=True)
class GroupVerdict:
    """A series' or a study's verdict, derived from its instances."""

    uid: str
    images: int
    scored: int
    outlier_instances: int
    label_checked: int
    label_mismatches: int
    min_p_value: float
    outlier: bool
    label_mismatch: bool
    series: tuple[GroupVerdict, ...] = ()

    def to_json(self) -> dict[str, Any]:
        doc = {k: v for k, v in asdict(self).items() if k != "series"}
        doc["min_p_value"] = _finite_or_none(self.min_p_value)
        if self.series:
            doc["series"] = [s.to_json() for s in self.series]
        return doc


def series_verdict(
    uid: str, instances: Iterable[InstanceVerdict], alpha: float | None = None
) -> GroupVerdict:
    """The series rule of the module docstring; ``alpha`` defaults to the one the verdicts used."""
    items = list(instances)
    if alpha is None:
        alpha = max((v.alpha for v in items), default=0.01)
    scored = [v for v in items if v.state == SCORED and math.isfinite(v.p_value)]
    flagged = sum(v.outlier for v in items)
    checked = [v for v in items if v.label is not None and v.label.checked]
    mismatches = sum(v.label_mismatch for v in checked)
    return GroupVerdict(
        uid=uid,
        images=len(items),
        scored=len(scored),
        outlier_instances=flagged,
        label_checked=len(checked),
        label_mismatches=mismatches,
        min_p_value=min((v.p_value for v in scored), default=math.nan),
        outlier=flagged > 0
        and binomial_tail(max(len(scored), flagged), flagged, alpha) <= alpha * (1 + 1e-9),
        label_mismatch=bool(checked) and 2 * mismatches > len(checked),
    )


def study_verdict(uid: str, series: Iterable[GroupVerdict]) -> GroupVerdict:
    """The study rule of the module docstring."""
    parts = tuple(sorted(series, key=lambda s: s.uid))
    p_values = [s.min_p_value for s in parts if math.isfinite(s.min_p_value)]
    return GroupVerdict(
        uid=uid,
        images=sum(s.images for s in parts),
        scored=sum(s.scored for s in parts),
        outlier_instances=sum(s.outlier_instances for s in parts),
        label_checked=sum(s.label_checked for s in parts),
        label_mismatches=sum(s.label_mismatches for s in parts),
        min_p_value=min(p_values, default=math.nan),
        outlier=any(s.outlier for s in parts),
        label_mismatch=any(s.label_mismatch for s in parts),
        series=parts,
    )
