"""The emulator's embedding functions. NOT A MEDICAL MODEL.

Nothing here has learned anything about medicine. The vectors are deterministic functions of
content, built so that tests of the pipeline's geometry (outliers, nearest neighbours, caching)
mean something:

* image: PNG -> grayscale -> 32x32 area-averaged thumbnail -> standardised (zero mean, unit
  variance) -> a fixed, seeded orthogonal transform (a random permutation, then three rounds of
  random signs and the normalised Walsh-Hadamard transform) -> L2-normalised.
  An orthogonal map preserves angles, so the cosine of two embeddings is exactly the correlation
  of the two thumbnails: similar pictures embed close together, different ones apart.
* text: lower-cased word tokens (the first 77, cut like CLIP's context) -> signed feature hashing
  into 1024 dimensions with a stable hash -> L2-normalised. Same words, same vector.

Image and text vectors live in unrelated spaces: image-text cosines (zero-shot "labels") carry no
meaning with the emulator. ``score`` maps a whole ``/score`` request body to its answer, so the
contract is tested without HTTP.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import io
import re
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image, UnidentifiedImageError

#: Length of every embedding, as MedImageInsight's.
EMBEDDING_DIM = 1024

#: Side of the thumbnail an image is reduced to; THUMBNAIL_SIDE**2 == EMBEDDING_DIM.
THUMBNAIL_SIDE = 32

#: Seed of the orthogonal transform; changing it changes every image embedding.
PROJECTION_SEED = 20241120

#: The log-scale temperature MedImageInsight returns with ``get_scaling_factor``.
SCALING_FACTOR = 4.51

#: Tokens of a text that count; the rest is cut, as the real model's 77-token context does.
MAX_TEXT_TOKENS = 77

#: Below this standard deviation a thumbnail is "constant" and gets the fixed vector.
_FLAT_STD = 1e-9

_WORD = re.compile(r"\w+")

Vector = npt.NDArray[np.float32]


class ImageDecodeError(ValueError):
    """The bytes are not a PNG this emulator can read."""


#: Rounds of (random signs, Walsh-Hadamard): three mix as well as a dense random rotation.
_MIXING_ROUNDS = 3


@functools.cache
def _mixing() -> tuple[npt.NDArray[np.intp], npt.NDArray[np.float64]]:
    """The seeded permutation and sign flips of the transform.

    A structured transform instead of the QR of a random matrix: no LAPACK, so nothing for a
    multi-threaded BLAS to stall on (a 1024x1024 QR took 6-16 s on two busy shared cores),
    and it costs O(n log n) per image.
    """
    rng = np.random.default_rng(PROJECTION_SEED)
    signs = rng.choice([-1.0, 1.0], size=(_MIXING_ROUNDS, EMBEDDING_DIM))
    return rng.permutation(EMBEDDING_DIM), signs


def _hadamard(vector: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """The orthonormal Walsh-Hadamard transform of a vector whose length is a power of two."""
    n = vector.shape[0]
    out = vector
    half = 1
    while half < n:
        pairs = out.reshape(-1, 2, half)
        out = np.stack([pairs[:, 0] + pairs[:, 1], pairs[:, 0] - pairs[:, 1]], axis=1).ravel()
        half *= 2
    scaled: npt.NDArray[np.float64] = out / np.sqrt(n)
    return scaled


def _rotate(vector: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """The fixed orthogonal transform of a ``EMBEDDING_DIM`` vector."""
    permutation, signs = _mixing()
    out = vector[permutation]
    for round_signs in signs:
        out = _hadamard(out * round_signs)
    return out


def thumbnail(png: bytes) -> npt.NDArray[np.float64]:
    """The ``THUMBNAIL_SIDE`` square grayscale, area-averaged thumbnail of a PNG, as floats."""
    try:
        with Image.open(io.BytesIO(png), formats=["PNG"]) as image:
            image.load()
            gray = image.convert("F")  # luminance for colour, values kept for 16-bit
    except (
        UnidentifiedImageError,
        Image.DecompressionBombError,
        OSError,
        SyntaxError,
        ValueError,
    ) as exc:
        raise ImageDecodeError(f"not a readable PNG: {exc}") from exc
    small = gray.resize((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float64)


def embed_image(png: bytes) -> Vector:
    """Unit vector of a PNG's content; identical pixels give identical vectors."""
    pixels = thumbnail(png).ravel()
    std = pixels.std()
    if std < _FLAT_STD * max(1.0, float(np.abs(pixels).max())):
        # A constant image has no pattern to standardise. Give it the all-ones ("DC") direction,
        # which is orthogonal to every standardised (zero-mean) thumbnail.
        z = np.ones(EMBEDDING_DIM)
    else:
        z = (pixels - pixels.mean()) / std
    return _unit(_rotate(z))


def tokens(text: str) -> list[str]:
    """Lower-cased word tokens of ``text``, cut to ``MAX_TEXT_TOKENS``."""
    return _WORD.findall(text.lower())[:MAX_TEXT_TOKENS]


def embed_text(text: str) -> Vector:
    """Unit vector of a text's words by signed feature hashing; the same words, the same vector."""
    vector = np.zeros(EMBEDDING_DIM)
    hashes = [_token_hash(token) for token in tokens(text) or ["<empty>"]]
    for value in hashes:
        vector[value % EMBEDDING_DIM] += 1.0 if (value >> 32) & 1 else -1.0
    if not vector.any():  # every token cancelled out: fall back to the first token alone
        vector[hashes[0] % EMBEDDING_DIM] = 1.0
    return _unit(vector)


def _token_hash(token: str) -> int:
    """A stable 64-bit hash of one token (Python's ``hash`` changes per process)."""
    digest = hashlib.blake2b(token.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


class BadRequest(ValueError):
    """The request body does not fit the contract; the message says where."""


def score(payload: Any, response_shape: str) -> Any:
    """The response body for a decoded ``/score`` request body, in ``response_shape``."""
    if not isinstance(payload, dict) or not isinstance(payload.get("input_data"), dict):
        raise BadRequest("body must be an object with an 'input_data' object")
    input_data = payload["input_data"]
    columns, data = input_data.get("columns"), input_data.get("data")
    if not isinstance(columns, list) or "image" not in columns or "text" not in columns:
        raise BadRequest(f"input_data.columns must list 'image' and 'text', got {columns!r:.80}")
    if not isinstance(data, list) or not data:
        raise BadRequest("input_data.data must be a non-empty list of rows")
    index = input_data.get("index")
    if index is not None and (not isinstance(index, list) or len(index) != len(data)):
        raise BadRequest(f"input_data.index must list one entry per row ({len(data)})")
    params = payload.get("params") or {}
    if not isinstance(params, dict):
        raise BadRequest("params must be an object")
    with_scale = bool(params.get("get_scaling_factor", False))
    image_col, text_col = columns.index("image"), columns.index("text")

    rows: list[dict[str, Any]] = []
    for i, row in enumerate(data):
        if not isinstance(row, list) or len(row) != len(columns):
            raise BadRequest(f"row {i}: expected a list of {len(columns)} values")
        image, text = row[image_col], row[text_col]
        if not isinstance(image, str) or not isinstance(text, str):
            raise BadRequest(f"row {i}: image and text must be strings ('' when absent)")
        if not image and not text:
            raise BadRequest(f"row {i}: has neither image nor text")
        out: dict[str, Any] = {}
        if image:
            out["image_features"] = [_embed_image(image, i).tolist()]
        if text:
            out["text_features"] = [embed_text(text).tolist()]
        rows.append(out)

    scale = {"scaling_factor": SCALING_FACTOR} if with_scale else {}
    if response_shape == "rows":
        return [{**row, **scale} for row in rows]
    columnar: dict[str, Any] = {}
    for key in ("image_features", "text_features"):
        vectors = [row[key][0] for row in rows if key in row]
        if vectors:
            columnar[key] = vectors
    return {**columnar, **scale}


def _embed_image(b64: str, row: int) -> Any:
    try:
        png = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadRequest(f"row {row}: image is not valid base64 ({exc})") from None
    try:
        return embed_image(png)
    except ImageDecodeError as exc:
        raise BadRequest(f"row {row}: image {exc}") from None


def _unit(vector: npt.NDArray[np.float64]) -> Vector:
    unit: Vector = (vector / np.linalg.norm(vector)).astype(np.float32)
    return unit
