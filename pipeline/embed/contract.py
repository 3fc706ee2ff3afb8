"""The MedImageInsight scoring contract as pure functions: rows -> request JSON -> embeddings.

No I/O here, so every shape the endpoint may answer with is pinned by tests without a socket.

Request (docs/architecture.md §7)::

    {"input_data": {"columns": ["image", "text"], "index": [0, ..., n-1],
                    "data": [[<base64 PNG or "">, <text or "">], ...]},
     "params": {"get_scaling_factor": true}}

Two response shapes are accepted, because both exist in the wild:

* ``rows`` (what real deployments return): a list with one object per row,
  ``[{"image_features": [[...1024]], "text_features": [[...1024]], "scaling_factor": 4.51}, ...]``;
  a feature is nested one level (``[[...]]``) or flat (``[...]``) and is present for the rows that
  sent that input.
* ``columns`` (what the documentation shows): one object of lists,
  ``{"image_features": [[...], [...]], "text_features": [[...]], "scaling_factor": 4.51}``,
  holding one vector per row that sent that input, in row order.

Anything else -- a missing field, a short list, another dimension, NaN, a zero vector -- is a
``ResponseFormatError``: a short answer must never be shifted onto the wrong images.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from pipeline.errors import ResponseFormatError

#: Length of every MedImageInsight embedding, image and text alike.
EMBEDDING_DIM = 1024

#: Column names of ``input_data``, in the order the endpoint expects.
COLUMNS = ("image", "text")

#: The two kinds of features a row can ask for, by response key.
_IMAGE_KEY = "image_features"
_TEXT_KEY = "text_features"

Matrix = npt.NDArray[np.float32]


@dataclass(frozen=True)
class Row:
    """One row of a scoring request: an image (PNG bytes), a text, or both."""

    image_png: bytes | None = None
    text: str | None = None

    def __post_init__(self) -> None:
        if not self.image_png and not self.text:
            raise ValueError("a Row needs a non-empty image_png or text (or both)")

    @property
    def has_image(self) -> bool:
        """Whether this row asks for image features."""
        return bool(self.image_png)

    @property
    def has_text(self) -> bool:
        """Whether this row asks for text features."""
        return bool(self.text)


@dataclass(frozen=True)
class EmbedResult:
    """Embeddings for a request, row-aligned with the rows that were sent.

    ``image`` and ``text`` are ``(n_rows, EMBEDDING_DIM)`` float32, each vector L2-normalised;
    the rows that did not send that input are NaN, so an index always means the same row.
    ``scaling_factor`` is the model's log-scale temperature (``None`` when not returned).
    """

    image: Matrix
    text: Matrix
    scaling_factor: float | None


def build_request(rows: Sequence[Row]) -> dict[str, Any]:
    """The JSON body for ``rows``; an absent image or text is sent as ``""``."""
    data = [
        [
            base64.b64encode(row.image_png).decode("ascii") if row.image_png else "",
            row.text or "",
        ]
        for row in rows
    ]
    return {
        "input_data": {"columns": list(COLUMNS), "index": list(range(len(rows))), "data": data},
        "params": {"get_scaling_factor": True},
    }


def parse_response(body: Any, rows: Sequence[Row]) -> EmbedResult:
    """Map decoded JSON onto ``rows``; ``ResponseFormatError`` if it does not fit the contract."""
    image_rows = [i for i, row in enumerate(rows) if row.has_image]
    text_rows = [i for i, row in enumerate(rows) if row.has_text]
    if isinstance(body, list):
        image, text, scale = _parse_rows_shape(body, rows)
    elif isinstance(body, dict):
        image = _column_matrix(body, _IMAGE_KEY, len(image_rows))
        text = _column_matrix(body, _TEXT_KEY, len(text_rows))
        scale = _scaling_factor(body.get("scaling_factor"), "response")
    else:
        raise ResponseFormatError(
            f"response is a JSON {type(body).__name__}; expected a list of row objects or an object"
        )
    return EmbedResult(
        image=_scatter(image, image_rows, len(rows)),
        text=_scatter(text, text_rows, len(rows)),
        scaling_factor=scale,
    )


def _parse_rows_shape(
    body: list[Any], rows: Sequence[Row]
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], float | None]:
    """The real deployments' shape: one object per row, each with the features it asked for."""
    if len(body) != len(rows):
        raise ResponseFormatError(f"response has {len(body)} row objects for {len(rows)} rows sent")
    images: list[npt.NDArray[np.float64]] = []
    texts: list[npt.NDArray[np.float64]] = []
    scale: float | None = None
    for i, (item, row) in enumerate(zip(body, rows, strict=True)):
        if not isinstance(item, dict):
            raise ResponseFormatError(f"row {i}: expected an object, got {type(item).__name__}")
        for wanted, key, out in (
            (row.has_image, _IMAGE_KEY, images),
            (row.has_text, _TEXT_KEY, texts),
        ):
            if wanted:  # a feature for an input the row did not send is ignored, not trusted
                out.append(_matrix(_field(item, key, f"row {i}"), 1, f"row {i} {key}")[0])
        if scale is None:
            scale = _scaling_factor(item.get("scaling_factor"), f"row {i}")
    return _stack(images), _stack(texts), scale


def _column_matrix(body: dict[str, Any], key: str, expected: int) -> npt.NDArray[np.float64]:
    """The documentation's shape: one list of vectors per feature, for the rows that sent it."""
    if expected == 0:
        return np.empty((0, EMBEDDING_DIM))
    return _matrix(_field(body, key, "response"), expected, key)


def _field(obj: dict[str, Any], key: str, where: str) -> Any:
    if key not in obj:
        raise ResponseFormatError(f"{where}: field {key!r} is missing (fields: {sorted(obj)})")
    return obj[key]


def _matrix(value: Any, expected: int, where: str) -> npt.NDArray[np.float64]:
    """``value`` as an ``(expected, EMBEDDING_DIM)`` array of finite, non-zero vectors."""
    try:
        array = np.asarray(value)
    except ValueError as exc:  # ragged nesting
        raise ResponseFormatError(f"{where}: not a rectangular list of numbers ({exc})") from exc
    if array.dtype.kind not in "iuf" or array.size == 0:
        raise ResponseFormatError(f"{where}: expected numbers, got {_describe(value)}")
    if array.ndim == 1:  # a single flat vector
        array = array[np.newaxis, :]
    elif array.ndim == 3 and array.shape[1] == 1:  # each vector nested one level: [[[...]], ...]
        array = array[:, 0, :]
    if array.ndim != 2:
        raise ResponseFormatError(f"{where}: expected vectors, got an array of shape {array.shape}")
    if array.shape[0] != expected:
        raise ResponseFormatError(f"{where}: {array.shape[0]} vectors for {expected} rows")
    if array.shape[1] != EMBEDDING_DIM:
        raise ResponseFormatError(
            f"{where}: vectors have dimension {array.shape[1]}, expected {EMBEDDING_DIM}"
        )
    vectors = array.astype(np.float64)
    bad = ~np.isfinite(vectors).all(axis=1)
    if bad.any():
        raise ResponseFormatError(f"{where}: vector {int(np.argmax(bad))} has NaN or infinity")
    return vectors


def _stack(vectors: list[npt.NDArray[np.float64]]) -> npt.NDArray[np.float64]:
    return np.stack(vectors) if vectors else np.empty((0, EMBEDDING_DIM))


def _scatter(vectors: npt.NDArray[np.float64], positions: list[int], n_rows: int) -> Matrix:
    """Normalise ``vectors`` into rows ``positions`` of an all-NaN ``(n_rows, D)`` matrix."""
    out = np.full((n_rows, EMBEDDING_DIM), np.nan, dtype=np.float32)
    if not positions:
        return out
    # Scale by the largest magnitude first so that huge finite values cannot overflow the norm.
    peak = np.abs(vectors).max(axis=1, keepdims=True)
    zero = peak[:, 0] == 0
    if zero.any():
        raise ResponseFormatError(f"row {positions[int(np.argmax(zero))]}: embedding is all zeros")
    scaled = vectors / peak
    out[positions] = scaled / np.linalg.norm(scaled, axis=1, keepdims=True)
    return out


def _scaling_factor(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, list) and len(value) == 1:  # a one-element tensor serialised as a list
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ResponseFormatError(f"{where}: scaling_factor is not a finite number: {value!r:.40}")
    return float(value)


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
