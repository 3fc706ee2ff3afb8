"""The request/response mapping of the MedImageInsight contract, without sockets."""

from __future__ import annotations

import base64
import math
from typing import Any

import numpy as np
import pytest

from pipeline.embed.contract import (
    EMBEDDING_DIM,
    Row,
    build_request,
    parse_response,
)
from pipeline.errors import PermanentEndpointError, ResponseFormatError

PNG_A = b"\x89PNG-a"
PNG_B = b"\x89PNG-b"


def vec(seed: int, scale: float = 3.0) -> list[float]:
    """A deterministic, not normalised 1024-d vector."""
    values: list[float] = (
        np.random.default_rng(seed).standard_normal(EMBEDDING_DIM) * scale
    ).tolist()
    return values


def unit(values: list[float]) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    return array / np.linalg.norm(array)


def test_build_request_matches_documented_body() -> None:
    """The body has columns image,text, an index 0..n-1, base64 PNGs and "" for absent fields."""
    rows = [Row(image_png=PNG_A), Row(text="x-ray chest"), Row(image_png=PNG_B, text="ct head")]
    body = build_request(rows)
    assert body == {
        "input_data": {
            "columns": ["image", "text"],
            "index": [0, 1, 2],
            "data": [
                [base64.b64encode(PNG_A).decode(), ""],
                ["", "x-ray chest"],
                [base64.b64encode(PNG_B).decode(), "ct head"],
            ],
        },
        "params": {"get_scaling_factor": True},
    }


def test_row_needs_image_or_text() -> None:
    """A row with neither an image nor a text is refused before anything is sent."""
    with pytest.raises(ValueError, match="image_png or text"):
        Row()
    with pytest.raises(ValueError):
        Row(image_png=b"", text="")


def test_rows_shape_nested_features_are_parsed_and_normalised() -> None:
    """List-of-rows with features nested one level gives row-aligned unit float32 vectors."""
    rows = [Row(image_png=PNG_A), Row(image_png=PNG_B)]
    body = [
        {"image_features": [vec(1)], "scaling_factor": 4.51},
        {"image_features": [vec(2)], "scaling_factor": 4.51},
    ]
    result = parse_response(body, rows)
    assert result.image.shape == (2, EMBEDDING_DIM)
    assert result.image.dtype == np.float32
    np.testing.assert_allclose(result.image[0], unit(vec(1)), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(result.image[1], unit(vec(2)), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.linalg.norm(result.image, axis=1), 1.0, rtol=1e-6)
    assert np.isnan(result.text).all()
    assert result.scaling_factor == 4.51


def test_rows_shape_flat_features_are_parsed() -> None:
    """List-of-rows with flat (un-nested) feature vectors parses the same as nested ones."""
    rows = [Row(image_png=PNG_A, text="chest")]
    nested = parse_response([{"image_features": [vec(1)], "text_features": [vec(2)]}], rows)
    flat = parse_response([{"image_features": vec(1), "text_features": vec(2)}], rows)
    np.testing.assert_array_equal(nested.image, flat.image)
    np.testing.assert_array_equal(nested.text, flat.text)
    assert flat.scaling_factor is None


def test_columns_shape_maps_vectors_to_the_rows_that_sent_them() -> None:
    """The documentation shape's lists hold one vector per row that sent that input, in order."""
    rows = [Row(image_png=PNG_A), Row(text="chest"), Row(image_png=PNG_B, text="head")]
    body = {
        "image_features": [vec(1), vec(2)],
        "text_features": [vec(3), vec(4)],
        "scaling_factor": 4.51,
    }
    result = parse_response(body, rows)
    np.testing.assert_allclose(result.image[0], unit(vec(1)), rtol=1e-6, atol=1e-7)
    assert np.isnan(result.image[1]).all()
    np.testing.assert_allclose(result.image[2], unit(vec(2)), rtol=1e-6, atol=1e-7)
    assert np.isnan(result.text[0]).all()
    np.testing.assert_allclose(result.text[1], unit(vec(3)), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(result.text[2], unit(vec(4)), rtol=1e-6, atol=1e-7)
    assert result.scaling_factor == 4.51


def test_columns_shape_single_flat_vector() -> None:
    """In the documentation shape a single row's feature may come as one flat vector."""
    result = parse_response({"text_features": vec(5)}, [Row(text="chest")])
    np.testing.assert_allclose(result.text[0], unit(vec(5)), rtol=1e-6, atol=1e-7)


def test_text_only_rows() -> None:
    """Text-only rows need no image_features field and leave the image matrix NaN."""
    rows = [Row(text="a"), Row(text="b")]
    result = parse_response([{"text_features": [vec(1)]}, {"text_features": [vec(2)]}], rows)
    assert np.isnan(result.image).all()
    assert np.isfinite(result.text).all()


def test_image_only_rows_ignore_unrequested_text() -> None:
    """A feature for an input the row did not send is ignored, not trusted."""
    rows = [Row(image_png=PNG_A)]
    result = parse_response([{"image_features": [vec(1)], "text_features": [vec(9)]}], rows)
    assert np.isnan(result.text).all()
    assert np.isfinite(result.image).all()


def test_huge_finite_values_normalise_without_overflow() -> None:
    """Vectors whose squared norm would overflow still normalise to unit length."""
    big = [1e300] * EMBEDDING_DIM
    result = parse_response([{"image_features": big}], [Row(image_png=PNG_A)])
    np.testing.assert_allclose(result.image[0], 1 / math.sqrt(EMBEDDING_DIM), rtol=1e-6)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ([{"image_features": [vec(1)]}], "1 row objects for 2 rows"),
        ({"image_features": [vec(1)]}, "1 vectors for 2 rows"),
        ({"image_features": [vec(1), vec(2), vec(3)]}, "3 vectors for 2 rows"),
        (
            [{"image_features": [vec(1)]}, {"text_features": [vec(2)]}],
            "'image_features' is missing",
        ),
        ({"text_features": [vec(1)]}, "'image_features' is missing"),
        ([{"image_features": [[0.5] * 512]}] * 2, "dimension 512, expected 1024"),
        ([{"image_features": [[math.nan] + [0.1] * 1023]}] * 2, "NaN or infinity"),
        ([{"image_features": [[math.inf] + [0.1] * 1023]}] * 2, "NaN or infinity"),
        ([{"image_features": [[0.0] * 1024]}] * 2, "all zeros"),
        ([{"image_features": [["0.5"] * 1024]}] * 2, "expected numbers"),
        ([{"image_features": [[0.1] * 1024, [0.1] * 1000]}] * 2, "rectangular"),
        ([{"image_features": [vec(1), vec(2)]}] * 2, "2 vectors for 1 rows"),
        ([{"image_features": [vec(1)], "scaling_factor": "4.5"}] * 2, "scaling_factor"),
        (["oops", "oops"], "expected an object"),
        ("oops", "JSON str"),
    ],
)
def test_malformed_responses_raise(body: Any, message: str) -> None:
    """Short, long, wrong-dimension, non-finite, zero or missing features are format errors."""
    rows = [Row(image_png=PNG_A), Row(image_png=PNG_B)]
    with pytest.raises(ResponseFormatError, match=message) as caught:
        parse_response(body, rows)
    assert isinstance(caught.value, PermanentEndpointError)
