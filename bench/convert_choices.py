"""The measurements behind two conversion choices: decoder plugin per syntax, PNG zlib settings.

    .venv/bin/python -m bench.convert_choices [--repeat 7]

Decoders: median CPU ms to decode one frame with each installed pydicom plugin, on real files
re-encoded by DCMTK (``dcmcjpeg``, ``dcmcjpls``, ``dcmcrle``) and pydicom-data's JPEG 2000 files,
plus the largest |delta| against the first plugin. PNG: KB and median CPU ms to encode 512x512
renders at zlib levels 1/3/6/9 and with the Z_RLE strategy. The results are tabled in the
docstrings of pipeline/convert/decode.py and png.py.
"""

from __future__ import annotations

import argparse
import io
import statistics
import subprocess
import tempfile
import time
import warnings
import zlib
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.pixels.decoders.base import get_decoder

from pipeline.convert import ConvertOptions, png, render_frame

#: (label, source file, DCMTK command re-encoding it, or None to use the file as shipped)
DECODE_CASES = [
    ("JPEG baseline US RGB", "US1_UNCR.dcm", ["dcmcjpeg", "+eb"]),
    ("JPEG extended MR 1024", "MR2_UNCR.dcm", ["dcmcjpeg", "+ee"]),
    ("JPEG lossless SV1 CT", "693_UNCR.dcm", ["dcmcjpeg", "+e1"]),
    ("JPEG lossless SV1 CR", "RG1_UNCR.dcm", ["dcmcjpeg", "+e1"]),
    ("JPEG-LS CT", "693_UNCR.dcm", ["dcmcjpls"]),
    ("JPEG-LS CR", "RG1_UNCR.dcm", ["dcmcjpls"]),
    ("JPEG-LS US RGB", "US1_UNCR.dcm", ["dcmcjpls"]),
    ("RLE CT", "693_UNCR.dcm", ["dcmcrle"]),
    ("RLE CR", "RG1_UNCR.dcm", ["dcmcrle"]),
    ("J2K lossless CT", "693_J2KR.dcm", None),
    ("J2K lossless CR", "RG1_J2KR.dcm", None),
    ("J2K lossy MR", "MR2_J2KI.dcm", None),
    ("J2K RCT US", "US1_J2KR.dcm", None),
]

PNG_FILES = ["693_UNCR.dcm", "CT_small.dcm", "RG1_UNCR.dcm", "MR2_UNCR.dcm", "US1_UNCR.dcm"]
PNG_SETTINGS = [(1, zlib.Z_DEFAULT_STRATEGY), (3, zlib.Z_DEFAULT_STRATEGY)]
PNG_SETTINGS += [(6, zlib.Z_DEFAULT_STRATEGY), (9, zlib.Z_DEFAULT_STRATEGY), (1, zlib.Z_RLE)]


def cpu_ms(action: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    """Median CPU ms of ``action`` and its last result."""
    times, result = [], None
    for _ in range(repeat):
        start = time.process_time()
        result = action()
        times.append(1000.0 * (time.process_time() - start))
    return statistics.median(times), result


def decoders(workdir: Path, repeat: int) -> None:
    print("decode ms per frame by plugin (max |delta| vs the first plugin)")
    for label, name, command in DECODE_CASES:
        path = Path(get_testdata_file(name))
        if command is not None:
            out = workdir / f"{label.replace(' ', '_')}.dcm"
            subprocess.run([*command, str(path), str(out)], check=True, capture_output=True)
            path = out
        ds = pydicom.dcmread(path)
        decoder = get_decoder(ds.file_meta.TransferSyntaxUID)
        cells, first = [], None
        for plugin in decoder.available_plugins:
            try:
                ms, arr = cpu_ms(partial(decoder.as_array, ds, decoding_plugin=plugin), repeat)
            except Exception:  # a plugin refusing the syntax is a result too
                cells.append(f"{plugin} -")
                continue
            arr = arr[0]
            first = arr if first is None else first
            delta = int(np.abs(arr.astype(np.int64) - first.astype(np.int64)).max())
            cells.append(f"{plugin} {ms:.1f} ({delta})")
        print(f"  {label:24} " + "  ".join(cells))


def encode(image: Image.Image, level: int, strategy: int) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=level, compress_type=strategy)
    return buf.getvalue()


def png_settings(repeat: int) -> None:
    print("PNG KB / ms of 512x512 renders: " + ", ".join(f"{lvl}/{s}" for lvl, s in PNG_SETTINGS))
    print("  (strategy 0 = default, 3 = Z_RLE)")
    for name in PNG_FILES:
        ds = pydicom.dcmread(get_testdata_file(name))
        if "WindowCenter" not in ds:
            ds.WindowCenter, ds.WindowWidth = 40, 400
        image = png.resize(render_frame(ds, 0, ConvertOptions(size=0)), 512)
        cells = []
        for level, strategy in PNG_SETTINGS:
            ms, data = cpu_ms(partial(encode, image, level, strategy), repeat)
            cells.append(f"{len(data) / 1000:4.0f}/{ms:5.1f}")
        print(f"  {name:14} " + "  ".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    with tempfile.TemporaryDirectory() as tmp:
        decoders(Path(tmp), args.repeat)
    png_settings(args.repeat)


if __name__ == "__main__":
    main()
