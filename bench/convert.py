"""Conversion benchmark: median ms per image by stage, PNG bytes, and dcmj2pnm in the same run.

    .venv/bin/python -m bench.convert [--repeat 15]

Stages are the pipeline's own functions, composed as ``to_png`` composes them (the bench checks
it gets the same bytes): decode = read the file + checks + decode the frame, LUT = Modality
LUT/VOI/polarity (or colour) to 8 bits, resize = Lanczos to 512x512, encode = PNG. The
reference is ``dcmj2pnm +on`` (PNG, native size, same window) on the same file (for JPEG 2000,
which DCMTK 3.6.7 cannot decode, on its uncompressed twin), process start included. Then the
issue's two targets for the uncompressed CT: total <= 1.2x encode, and PNG <= 70 KB for <= 20%
more CPU than zlib level 1.
"""

from __future__ import annotations

import argparse
import io
import resource
import statistics
import subprocess
import tempfile
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.data import get_testdata_file

from bench.convert_choices import encode
from pipeline.convert import ConvertOptions, decode, png, to_png, to_u8
from tests import factory

OPTIONS = ConvertOptions(frame_policy="all")
STAGES = ("decode", "lut", "resize", "encode")


@dataclass(frozen=True)
class Case:
    name: str
    make: Callable[[Path], Path]
    dcmtk_args: tuple[str, ...] = ("+Wi", "1")
    dcmtk_file: str = ""  # DCMTK 3.6.7 has no JPEG 2000 codec: it renders this twin instead


def shipped(name: str) -> Callable[[Path], Path]:
    return lambda _workdir: Path(get_testdata_file(name))


def jpeg_lossless_ct(workdir: Path) -> Path:
    out = workdir / "ct_sv1.dcm"
    subprocess.run(["dcmcjpeg", "+e1", get_testdata_file("693_UNCR.dcm"), str(out)], check=True)
    return out


def large_cr(workdir: Path) -> Path:
    """RG1 (a real MONOCHROME1 CR, 1955x1841) resampled to 2500 rows x 2000 columns."""
    ds = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))
    image = Image.fromarray(ds.pixel_array.astype(np.int32)).resize((2000, 2500))
    ds.Rows, ds.Columns = 2500, 2000
    ds.PixelData = np.asarray(image).astype("<u2").tobytes()
    return factory.write(ds, workdir / "cr.dcm")


def multiframe_mr(workdir: Path) -> Path:
    """20 frames of 256x256 cut from MR2 (a real 1024x1024 MR) at shifting offsets."""
    source = pydicom.dcmread(get_testdata_file("MR2_UNCR.dcm"))
    mr = source.pixel_array
    frames = np.stack([mr[100 + 20 * f : 612 + 20 * f : 2, 256:768:2] for f in range(20)])
    ds = factory.gray_image(frames.astype(np.uint16), bits_stored=12, modality="MR")
    ds.WindowCenter, ds.WindowWidth = source.WindowCenter, source.WindowWidth
    ds.RescaleSlope, ds.RescaleIntercept = source.RescaleSlope, source.RescaleIntercept
    return factory.write(ds, workdir / "mr.dcm")


CASES = [
    Case("CT 512² int16 (693_UNCR)", shipped("693_UNCR.dcm")),
    Case("CR 2500x2000 MONO1", large_cr),
    Case("US RGB 640x480 (US1)", shipped("US1_UNCR.dcm"), ()),
    Case("JPEG-lossless CT (SV1)", jpeg_lossless_ct),
    Case("J2K CT (693_J2KR)", shipped("693_J2KR.dcm"), dcmtk_file="693_UNCR.dcm"),
    Case("MR 20 frames 256²", multiframe_mr),
]


def run_ours(path: Path) -> tuple[dict[str, float], list[bytes]]:
    """One conversion timed by stage (ms per frame) and its PNGs."""
    times = dict.fromkeys(STAGES, 0.0)
    start = time.process_time()
    ds = decode.read(path, OPTIONS.max_decoded_bytes)
    options = OPTIONS.for_modality(str(ds.get("Modality", "")))
    n = decode.frame_count(ds)
    decoder = decode.check(ds, options.max_pixels, options.max_decoded_bytes, n)
    times["decode"] += time.process_time() - start
    pngs = []
    for frame in range(n):
        t0 = time.process_time()
        stored, bits_stored, _plugin = decode.decode_frame(ds, decoder, frame)
        t1 = time.process_time()
        grey = to_u8(ds, stored, frame, options, bits_stored)
        t2 = time.process_time()
        image = png.resize(grey, options.size)
        t3 = time.process_time()
        pngs.append(png.encode_image(image))
        t4 = time.process_time()
        for stage, seconds in zip(STAGES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            times[stage] += seconds
    return {stage: 1000.0 * seconds / n for stage, seconds in times.items()}, pngs


def run_dcmtk(path: Path, args: tuple[str, ...], out: Path, frames: int) -> float:
    """CPU ms (user + system) per frame of dcmj2pnm writing PNG(s) of every frame."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(
        ["dcmj2pnm", "+on", "-O", "+Fa", *args, str(path), str(out)],
        check=True,
        capture_output=True,
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return 1000.0 * cpu / frames


def median_ms(samples: list[dict[str, float]]) -> dict[str, float]:
    medians = {stage: statistics.median(s[stage] for s in samples) for stage in STAGES}
    medians["total"] = statistics.median(sum(s.values()) for s in samples)
    return medians


def versus_level_1(image: Image.Image, repeat: int) -> tuple[float, int, float]:
    """(our encode ms, level-1 bytes, level-1 ms), CPU medians measured in alternation so that
    load from other processes hits both alike."""
    ours, level1 = [], []
    for _ in range(repeat):
        start = time.process_time()
        png.encode_image(image)
        ours.append(1000.0 * (time.process_time() - start))
        start = time.process_time()
        data = encode(image, 1, zlib.Z_DEFAULT_STRATEGY)
        level1.append(1000.0 * (time.process_time() - start))
    return statistics.median(ours), len(data), statistics.median(level1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()
    header = (
        f"{'case':26} {'decode':>7} {'LUT':>6} {'resize':>7} {'encode':>7} {'total':>7} "
        f"{'PNG KB':>7} {'dcmj2pnm':>9} {'ratio':>6}"
    )
    print("median CPU ms per image (per frame for the MR); ratio = our total / dcmj2pnm's")
    print(header)
    ct: dict[str, float] = {}
    ct_image = Image.new("L", (1, 1))
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for case in CASES:
            path = case.make(workdir)
            reference = Path(get_testdata_file(case.dcmtk_file)) if case.dcmtk_file else path
            repeat = max(3, args.repeat // 3) if "CR" in case.name else args.repeat
            runs = [run_ours(path) for _ in range(repeat)]
            pngs = runs[-1][1]
            frames = len(pngs)
            assert pngs == to_png(pydicom.dcmread(path), OPTIONS), "bench must match to_png"
            ms = median_ms([r[0] for r in runs])
            dcmtk = statistics.median(
                run_dcmtk(reference, case.dcmtk_args, workdir / "out.png", frames)
                for _ in range(repeat)
            )
            kb = statistics.mean(len(p) for p in pngs) / 1000.0
            print(
                f"{case.name:26} {ms['decode']:7.2f} {ms['lut']:6.2f} {ms['resize']:7.2f} "
                f"{ms['encode']:7.2f} {ms['total']:7.2f} {kb:7.1f} {dcmtk:9.2f} "
                f"{ms['total'] / dcmtk:6.2f}"
            )
            if not ct:
                ct = {**ms, "kb": kb}
                ct_image = Image.open(io.BytesIO(pngs[0]))
                ct_image.load()
    ours_ms, level1_bytes, level1_ms = versus_level_1(ct_image, 5 * args.repeat)
    print()
    print(
        f"uncompressed CT: total {ct['total']:.2f} ms = {ct['total'] / ct['encode']:.2f}x the "
        f"PNG encode ({ct['encode']:.2f} ms); target <= 1.2x"
    )
    print(
        f"uncompressed CT PNG: {ct['kb']:.1f} KB at {ours_ms:.2f} ms (Z_RLE) vs zlib level 1 "
        f"{level1_bytes / 1000:.1f} KB at {level1_ms:.2f} ms: CPU "
        f"{ours_ms / level1_ms:.2f}x level 1; targets <= 70 KB and <= 1.2x"
    )


if __name__ == "__main__":
    main()
