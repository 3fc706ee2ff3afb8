"""Synthetic radiographs for bench/verdicts: chest PAs with anatomical variation, and the
planted outliers a PACS really sends into a chest cohort.

Every image is a 12-bit CR DICOM object (no patient data) that goes through the daemon's real
conversion (``pipeline.convert.to_png``). Normal variation: patient size and position, rotation,
inspiration depth, heart size, rib phase, clavicles, side markers, collimation, exposure, noise,
and MONOCHROME1 or MONOCHROME2 storage. Outliers keep the chest header (CR, CHEST) unless the
kind is itself a header error.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ComputedRadiographyImageStorage, ExplicitVRLittleEndian, generate_uid

from tests import factory

SIDE = 256
TOP = 4095  # 12-bit
#: The cohort's usual window (center, width), kept by the frames that have no anatomy to window.
FLAT_WINDOW = (1700.0, 2600.0)
Image = tuple[np.ndarray, dict[str, Any]]  # stored pixels (float), header fields


class _Frame:
    """A posed coordinate grid: x, y in about -1..1, randomly shifted, scaled and rotated."""

    def __init__(self, rng: np.random.Generator, spread: float = 1.0) -> None:
        yy, xx = np.mgrid[0:SIDE, 0:SIDE].astype(np.float64)
        x0, y0 = (xx + 0.5) / SIDE * 2 - 1, (yy + 0.5) / SIDE * 2 - 1
        angle = rng.normal(0, 0.05 * spread)
        scale = rng.normal(1.0, 0.06 * spread)
        dx, dy = rng.normal(0, 0.04 * spread, 2)
        self.x = (np.cos(angle) * x0 - np.sin(angle) * y0) / scale - dx
        self.y = (np.sin(angle) * x0 + np.cos(angle) * y0) / scale - dy

    def ellipse(self, cx: float, cy: float, ax: float, ay: float, edge: float = 0.08) -> Any:
        r = np.sqrt(((self.x - cx) / ax) ** 2 + ((self.y - cy) / ay) ** 2)
        return np.clip((1 - r) / edge, 0, 1)

    def band(self, centre: Any, half_width: float, edge: float = 0.02) -> Any:
        return np.clip((half_width - np.abs(centre)) / edge, 0, 1)


def _expose(rng: np.random.Generator, attenuation: Any, noise: float = 0.012) -> Any:
    """Attenuation (0..~1.5) -> 12-bit stored values: exposure, offset, quantum noise."""
    signal = attenuation * rng.normal(2300, 150) + rng.normal(500, 60)
    return np.clip(signal + rng.normal(0, noise * 2300, signal.shape), 0, TOP)


def chest_attenuation(rng: np.random.Generator) -> Any:
    f = _Frame(rng)
    j = rng.normal(0, 1, 12)
    torso = f.ellipse(0, 0.15, 0.92 + 0.05 * j[0], 1.25, 0.12)
    att = 0.35 * torso
    shoulders = f.ellipse(-0.75, -0.85, 0.35, 0.25, 0.2) + f.ellipse(0.75, -0.85, 0.35, 0.25, 0.2)
    att += 0.25 * shoulders
    lungs = sum(
        f.ellipse(
            side * (0.4 + 0.03 * j[1]),
            -0.08 + 0.03 * j[2],
            0.27 + 0.025 * j[3],
            0.52 + 0.05 * j[4],
            0.25,
        )
        for side in (-1, 1)
    )
    att += 0.45 * torso - 0.5 * lungs
    att += 0.25 * f.band(f.x - 0.02 * j[5], 0.13, 0.08) * (f.y > -0.9)  # mediastinum
    att += 0.08 * f.band(f.x - 0.02 * j[5], 0.05, 0.02)  # spine, faint behind it
    att += 0.3 * f.ellipse(0.15 + 0.03 * j[6], 0.24, 0.28 + 0.035 * j[7], 0.24, 0.3)  # heart
    ribs = f.band(np.sin((f.y * 6.5 + 1.4 * f.x**2 + 0.1 * j[8]) * np.pi), 0.25, 0.2)
    att += 0.07 * ribs * np.clip(lungs, 0, 1)
    for side in (-1, 1):  # clavicles
        att += 0.12 * f.band(f.y + 0.62 - side * 0.18 * f.x, 0.025) * (np.abs(f.x) < 0.55)
    dome = 0.42 + 0.05 * j[9] + 0.35 * (np.abs(f.x) - 0.25) ** 2
    att += 0.4 * np.clip((f.y - dome) / 0.05, 0, 1) * torso
    if rng.random() < 0.3:  # a lead side marker in a top corner
        cx = rng.choice([-0.8, 0.8])
        att += 1.2 * f.ellipse(cx, -0.85, 0.05, 0.05, 0.3)
    if rng.random() < 0.4:  # collimation: unexposed borders read as dense
        m = rng.uniform(0.0, 0.08, 4)
        out = (f.x < -1 + m[0]) | (f.x > 1 - m[1]) | (f.y < -1 + m[2]) | (f.y > 1 - m[3])
        att = np.where(out, 1.3, att)
    return att


def chest(rng: np.random.Generator) -> Image:
    """A normal chest PA; 30% stored MONOCHROME1 (inverted values), as CR plates often are."""
    stored = _expose(rng, chest_attenuation(rng))
    return _stored_as_device_would(rng, stored)


def _chest_header(window: tuple[float, float]) -> dict[str, Any]:
    """The header of a CR chest stored MONOCHROME2 with ``window`` (center, width)."""
    return {"modality": "CR", "body_part": "CHEST", "photometric": "MONOCHROME2", "window": window}


def _stored_as_device_would(rng: np.random.Generator, stored: Any) -> Image:
    """A CR chest header windowed on the data; 30% stored MONOCHROME1 (values inverted)."""
    lo, hi = np.percentile(stored, [1, 99])
    window = ((lo + hi) / 2 + rng.normal(0, 40), (hi - lo) * rng.uniform(1.0, 1.2))
    if rng.random() < 0.3:
        inverted = _chest_header((TOP - window[0], window[1]))
        return TOP - stored, {**inverted, "photometric": "MONOCHROME1"}
    return stored, _chest_header(window)


def abdomen(rng: np.random.Generator) -> Image:
    f = _Frame(rng)
    torso = f.ellipse(0, 0, rng.normal(1.15, 0.05), 1.5, 0.15)  # AP: fills the detector
    att = 0.75 * torso + 0.3 * f.band(f.x, 0.1, 0.04)  # spine
    att += 0.3 * sum(f.ellipse(s * 0.5, 0.75, 0.35, 0.25, 0.2) for s in (-1, 1))  # iliac wings
    att += 0.15 * f.ellipse(-0.45, -0.55, 0.45, 0.35, 0.3)  # liver
    for _ in range(int(rng.integers(8, 20))):  # bowel gas
        att -= 0.35 * f.ellipse(*rng.uniform(-0.6, 0.6, 2), *rng.uniform(0.05, 0.14, 2), 0.4)
    return _stored_as_device_would(rng, _expose(rng, att))


def hand(rng: np.random.Generator) -> Image:
    f = _Frame(rng, 2.0)
    att = 0.6 * f.ellipse(0, 0.35, 0.42, 0.4, 0.15)  # palm
    for i, angle in enumerate(np.linspace(-0.9, 0.5, 5)):
        length = 0.45 if i else 0.3
        cx, cy = 0.5 * np.sin(angle), 0.05 - 0.5 * np.cos(angle)
        att += 0.55 * f.ellipse(cx, cy - 0.1, 0.07, length, 0.3)
    return _stored_as_device_would(rng, _expose(rng, att))


def ct_slice(rng: np.random.Generator) -> Image:
    """An axial CT slice (another modality) under a chest radiograph's header."""
    hu = factory.phantom(SIDE, SIDE, seed=int(rng.integers(1 << 30)), z=float(rng.random()))
    return np.clip(hu + 1024, 0, TOP), _chest_header((1064.0, 400.0))


def inverted(rng: np.random.Generator) -> Image:
    """Polarity error: MONOCHROME1 data labelled MONOCHROME2 (the chest shows as a negative)."""
    stored, header = chest(rng)
    if header["photometric"] == "MONOCHROME1":
        return stored, {**header, "photometric": "MONOCHROME2"}
    return TOP - stored, {**header, "window": (TOP - header["window"][0], header["window"][1])}


def blank(rng: np.random.Generator) -> Image:
    """An unexposed plate: flat readout with electronic noise, the cohort's usual window."""
    stored = np.clip(rng.normal(rng.uniform(100, 300), 2, (SIDE, SIDE)), 0, TOP)
    return stored, _chest_header(FLAT_WINDOW)


def saturated(rng: np.random.Generator) -> Image:
    """Detector saturation: almost everything at the top of the range."""
    stored = np.clip(TOP - np.abs(rng.normal(0, 3, (SIDE, SIDE))), 0, TOP)
    return stored, _chest_header(FLAT_WINDOW)


def wrong_window(rng: np.random.Generator) -> Image:
    """A chest whose header window sits at one end of the data: nearly all black or white."""
    stored, header = chest(rng)
    q = 98.0 if rng.random() < 0.5 else 2.0
    return stored, {**header, "window": (float(np.percentile(stored, q)), 60.0)}


def noisy(rng: np.random.Generator) -> Image:
    """Gross noise: a badly underexposed chest, noise twice the anatomy's contrast."""
    stored = _expose(rng, chest_attenuation(rng), noise=0.5)
    return _stored_as_device_would(rng, stored)


def rotated(rng: np.random.Generator) -> Image:
    """A chest stored on its side (orientation error)."""
    stored, header = chest(rng)
    return np.rot90(stored, int(rng.choice([1, 3]))), header


OUTLIERS: dict[str, Callable[[np.random.Generator], Image]] = {
    "abdomen radiograph": abdomen,
    "hand radiograph": hand,
    "CT slice (other modality)": ct_slice,
    "inverted polarity": inverted,
    "blank frame": blank,
    "saturated frame": saturated,
    "wrong window": wrong_window,
    "heavy noise": noisy,
    "rotated 90 degrees": rotated,
}

#: What each mislabelled outlier really shows, as a label-check label.
TRUE_LABELS = {
    "abdomen radiograph": "XR/ABDOMEN",
    "hand radiograph": "XR/HAND",
    "CT slice (other modality)": "CT/CHEST",
}


def dataset(stored: Any, header: dict[str, Any]) -> pydicom.Dataset:
    """A minimal CR object around ``stored`` (no patient data at all)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage
    meta.MediaStorageSOPInstanceUID = uid = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = ComputedRadiographyImageStorage, uid
    ds.StudyInstanceUID = ds.SeriesInstanceUID = generate_uid()
    ds.Modality, ds.BodyPartExamined = header["modality"], header["body_part"]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, header["photometric"]
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth = [round(float(v), 1) for v in header["window"]]
    ds.PixelData = np.ascontiguousarray(np.rint(stored), dtype="<u2").tobytes()
    return ds
