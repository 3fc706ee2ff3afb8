"""Synthetic DICOM objects for tests, with realistic tags (PHI included on purpose).

Tests about PHI and UIDs only mean something when the objects carry patient data and
well-formed UIDs, so every object here has a patient name, ID, birth date and accession
number, and complete file meta, like what a PACS sends.

CT choice: signed int16 stored values with **Bits Stored 16** (High Bit 15). Stored value =
HU + 1024 for the phantom, i.e. 0..~3000; 12 signed bits would cap at 2047 (HU 1023) and clip
dense bone, so 16 is the honest header for arbitrary ``pixels``.
"""

from __future__ import annotations

import pathlib

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ComputedRadiographyImageStorage,
    CTImageStorage,
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    UltrasoundMultiFrameImageStorage,
    generate_uid,
)

#: Patient data every synthetic object carries, so PHI-leak tests have something to find.
PATIENT_NAME = "Doe^Jane"
PATIENT_ID = "PID-12345"
PATIENT_BIRTH_DATE = "19700101"
ACCESSION_NUMBER = "ACC-0001"
STUDY_DATE = "20240315"
STUDY_TIME = "101500"

#: Basic Text SR; an object without Pixel Data.
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"


def new_uid() -> str:
    """A fresh, globally unique UID (pydicom root)."""
    return str(generate_uid())


def _base(sop_class_uid: str, modality: str, transfer_syntax: str, **uids: str) -> pydicom.Dataset:
    """Patient/study/series/equipment modules plus complete file meta."""
    sop_instance_uid = uids.get("sop_instance_uid") or new_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "PACS_EMBED_TEST"

    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_instance_uid
    ds.StudyInstanceUID = uids.get("study_uid") or new_uid()
    ds.SeriesInstanceUID = uids.get("series_uid") or new_uid()
    ds.FrameOfReferenceUID = uids.get("frame_of_reference_uid") or new_uid()
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.PatientBirthDate = PATIENT_BIRTH_DATE
    ds.PatientSex = "F"
    ds.AccessionNumber = ACCESSION_NUMBER
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = STUDY_DATE
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = STUDY_TIME
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.ReferringPhysicianName = "Smith^John"
    ds.InstitutionName = "General Hospital"
    ds.Manufacturer = "pacs-embed tests"
    ds.Modality = modality
    return ds


def phantom(rows: int = 512, columns: int = 512, seed: int = 0, z: float = 0.0) -> np.ndarray:
    """A smooth chest-like CT slice in HU (float64): air, body, two lungs, spine, heart.

    ``seed`` moves and resizes the structures and changes a low-frequency texture, so different
    seeds give visibly different images; ``z`` (0..1) varies the anatomy along a series.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:rows, 0:columns].astype(np.float64)
    y = (yy + 0.5) / rows * 2.0 - 1.0  # -1..1
    x = (xx + 0.5) / columns * 2.0 - 1.0

    def ellipse(cx: float, cy: float, ax: float, ay: float) -> np.ndarray:
        return bool_soft(((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2)

    def bool_soft(r2: np.ndarray) -> np.ndarray:
        # A soft edge a few pixels wide keeps the image smooth (no aliasing staircase).
        edge = 4.0 / max(rows, columns)
        return np.clip((1.0 - r2) / edge, 0.0, 1.0)

    j = rng.uniform(-0.06, 0.06, size=8)
    hu = np.full((rows, columns), -1000.0)
    body = ellipse(j[0], j[1], 0.85 + j[2], 0.62 + j[3])
    hu += body * (1000.0 + 30.0)  # soft tissue ~30 HU
    for side in (-1.0, 1.0):
        lung = ellipse(side * (0.38 + j[4]), -0.05 + j[5], 0.28 + 0.05 * z, 0.42 - 0.1 * z)
        hu -= lung * body * 850.0  # lung ~ -820 HU
    heart = ellipse(0.08 + j[6], 0.12, 0.22 + 0.05 * z, 0.2)
    hu += heart * 10.0
    spine = ellipse(j[7], 0.45, 0.09, 0.09)
    hu += spine * 700.0  # bone
    # Low-frequency texture: a few random sinusoids, amplitude ~25 HU inside the body.
    for _ in range(4):
        fx, fy = rng.uniform(1.0, 6.0, size=2)
        ph = rng.uniform(0, 2 * np.pi)
        hu += body * 25.0 * np.sin(np.pi * (fx * x + fy * y) + ph)
    return hu


def ct_slice(
    *,
    study_uid: str,
    series_uid: str,
    instance_number: int,
    pixels: np.ndarray | None = None,
    rows: int = 512,
    columns: int = 512,
    seed: int = 0,
    sop_instance_uid: str | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
) -> pydicom.Dataset:
    """One CT slice; ``pixels`` are *stored* values (int16), HU = stored - 1024.

    With ``pixels`` None a phantom depending on ``seed`` is generated. Compressed
    ``transfer_syntax`` values are honoured by compressing with pydicom's encoders (RLE, JPEG-LS
    and J2K need the matching encoder plugin); use DCMTK for the rest.
    """
    ds = _base(
        CTImageStorage,
        "CT",
        ExplicitVRLittleEndian,
        study_uid=study_uid,
        series_uid=series_uid,
        sop_instance_uid=sop_instance_uid or "",
    )
    if pixels is None:
        hu = phantom(rows, columns, seed=seed, z=(instance_number % 50) / 50.0)
        pixels = np.clip(np.rint(hu) + 1024, -32768, 32767).astype(np.int16)
    pixels = np.asarray(pixels)
    if pixels.ndim != 2:
        raise ValueError(f"pixels must be 2-D, got shape {pixels.shape}")
    rows, columns = pixels.shape
    thickness = 2.5
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.InstanceNumber = instance_number
    ds.BodyPartExamined = "CHEST"
    ds.PatientPosition = "HFS"
    ds.SliceThickness = thickness
    ds.PixelSpacing = [0.7, 0.7]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [-179.2, -179.2, -instance_number * thickness]
    ds.SliceLocation = -instance_number * thickness
    ds.KVP = 120
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    ds.WindowCenter = 40
    ds.WindowWidth = 400
    ds.WindowCenterWidthExplanation = "MEDIASTINUM"
    ds.PixelData = pixels.astype("<i2").tobytes()
    if transfer_syntax != ExplicitVRLittleEndian:
        ds.compress(transfer_syntax)
    return ds


def ct_series(
    n: int = 20,
    *,
    rows: int = 512,
    columns: int = 512,
    seed: int = 0,
    identical: tuple[int, int] | None = (0, 1),
) -> list[pydicom.Dataset]:
    """One study, one series of ``n`` slices; the pair ``identical`` shares exact pixel data."""
    study_uid, series_uid = new_uid(), new_uid()
    slices = [
        ct_slice(
            study_uid=study_uid,
            series_uid=series_uid,
            instance_number=i + 1,
            rows=rows,
            columns=columns,
            seed=seed * 100_003 + i,
        )
        for i in range(n)
    ]
    if identical is not None:
        i, j = identical
        slices[j].PixelData = slices[i].PixelData
    return slices


def mono1_cr(
    *,
    rows: int = 256,
    columns: int = 256,
    bits_stored: int = 12,
    window: tuple[float, float] | None = (2048.0, 4096.0),
    seed: int = 0,
) -> pydicom.Dataset:
    """A MONOCHROME1 CR (unsigned, 16 allocated): high stored values display dark."""
    ds = _base(ComputedRadiographyImageStorage, "CR", ExplicitVRLittleEndian)
    rng = np.random.default_rng(seed)
    hi = (1 << bits_stored) - 1
    yy, xx = np.mgrid[0:rows, 0:columns]
    ramp = (xx / max(columns - 1, 1) * 0.7 + yy / max(rows - 1, 1) * 0.3) * hi
    pixels = np.clip(ramp + rng.normal(0, hi * 0.01, (rows, columns)), 0, hi).astype(np.uint16)
    ds.InstanceNumber = 1
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits_stored, bits_stored - 1
    ds.PixelRepresentation = 0
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = pixels.tobytes()
    return ds


def with_voi_lut_sequence(
    ds: pydicom.Dataset, *, lut_bits: int = 12, first_mapped: int = 0, entries: int = 4096
) -> pydicom.Dataset:
    """Replace ``ds``'s window with a VOI LUT Sequence: a gamma-ish curve, ``lut_bits`` wide."""
    for kw in ("WindowCenter", "WindowWidth", "WindowCenterWidthExplanation"):
        if kw in ds:
            delattr(ds, kw)
    top = (1 << lut_bits) - 1
    t = np.linspace(0.0, 1.0, entries)
    data = np.rint(top * t**0.7).astype(np.uint16)
    item = pydicom.Dataset()
    item.LUTDescriptor = [entries if entries < 65536 else 0, first_mapped, lut_bits]
    item.LUTExplanation = "GAMMA"
    item.LUTData = data.tolist()
    item["LUTData"].VR = "US"
    ds.VOILUTSequence = Sequence([item])
    return ds


def rgb_us(
    *, planar: int = 0, rows: int = 120, columns: int = 160, frames: int = 1, seed: int = 0
) -> pydicom.Dataset:
    """An RGB ultrasound (multi-frame when ``frames`` > 1), interleaved or planar as asked."""
    ds = _base(UltrasoundMultiFrameImageStorage, "US", ExplicitVRLittleEndian)
    rgb = rgb_pixels(rows, columns, frames, seed)
    ds.InstanceNumber = 1
    ds.BodyPartExamined = "ABDOMEN"
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = planar
    ds.Rows, ds.Columns = rows, columns
    ds.NumberOfFrames = frames
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelRepresentation = 0
    # Planar 1: per frame, all R then all G then all B.
    stored = rgb.transpose(0, 3, 1, 2) if planar else rgb
    ds.PixelData = np.ascontiguousarray(stored).tobytes()
    return ds


def rgb_pixels(rows: int, columns: int, frames: int = 1, seed: int = 0) -> np.ndarray:
    """Distinct, deterministic RGB content, shape (frames, rows, columns, 3), uint8."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:rows, 0:columns]
    out = np.empty((frames, rows, columns, 3), np.uint8)
    for f in range(frames):
        off = rng.integers(0, 255, 3)
        out[f, ..., 0] = (xx * 255 // max(columns - 1, 1) + off[0] + f * 40) % 256
        out[f, ..., 1] = (yy * 255 // max(rows - 1, 1) + off[1]) % 256
        out[f, ..., 2] = ((xx + yy) % 64) * 4 + off[2] % 4
    return out


def mono_multiframe(*, frames: int = 10, rows: int = 64, columns: int = 64) -> pydicom.Dataset:
    """An 8-bit MONOCHROME2 multi-frame whose frame ``f`` is filled with the value ``f * 10``."""
    ds = _base(UltrasoundMultiFrameImageStorage, "US", ExplicitVRLittleEndian)
    ds.InstanceNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, columns
    ds.NumberOfFrames = frames
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelRepresentation = 0
    data = np.repeat(np.arange(frames, dtype=np.uint8) * 10, rows * columns)
    ds.PixelData = data.tobytes()
    return ds


def gray_image(
    pixels: np.ndarray,
    *,
    bits_allocated: int | None = None,
    bits_stored: int | None = None,
    modality: str = "OT",
    photometric: str = "MONOCHROME2",
    window: tuple[float, float] | None = None,
    rescale: tuple[float, float] | None = None,
) -> pydicom.Dataset:
    """A grey Secondary Capture of ``pixels`` (2-D, or 3-D for frames) stored as given.

    The dtype decides Pixel Representation (signed or not) and, unless ``bits_allocated`` says
    otherwise, Bits Allocated; bool pixels are packed as Bits Allocated 1. ``window`` is
    (center, width); ``rescale`` is (slope, intercept).
    """
    ds = _base(SecondaryCaptureImageStorage, modality, ExplicitVRLittleEndian)
    frames = pixels if pixels.ndim == 3 else pixels[np.newaxis]
    allocated = bits_allocated or (1 if pixels.dtype == np.bool_ else 8 * pixels.dtype.itemsize)
    ds.InstanceNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    if frames.shape[0] > 1:
        ds.NumberOfFrames = frames.shape[0]
    ds.Rows, ds.Columns = frames.shape[1:]
    ds.BitsAllocated = allocated
    ds.BitsStored = bits_stored or allocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if pixels.dtype.kind == "i" else 0
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    if allocated == 1:
        data = np.packbits(frames.astype(bool).ravel(), bitorder="little").tobytes()
    else:
        data = frames.astype(frames.dtype.newbyteorder("<")).tobytes()
    ds.PixelData = data + b"\0" * (len(data) % 2)
    return ds


def basic_text_sr() -> pydicom.Dataset:
    """A Basic Text SR: a real-looking object with no Pixel Data."""
    ds = _base(BASIC_TEXT_SR, "SR", ExplicitVRLittleEndian)
    ds.InstanceNumber = 1
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    return ds


def write(ds: pydicom.Dataset, path: pathlib.Path) -> pathlib.Path:
    """Save ``ds`` as a Part 10 file (preamble + file meta) and return ``path``."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path
