"""Zero-shot label check: probabilities, the margin rule, prompt embeddings cached in Redis."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
import redis

from pipeline.detect.labels import PromptEmbeddings, header_label, judge, zero_shot
from pipeline.embed.contract import EmbedResult, Row
from pipeline.errors import TransientEndpointError

PROMPTS = {"XR/CHEST": "x-ray chest posteroanterior", "CT/HEAD": "ct head axial"}


class TextStub:
    """Text vector = one-hot by prompt length; counts calls; can be made to fail."""

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[list[str]] = []
        self.fail = fail

    def embed(self, rows: Sequence[Row]) -> EmbedResult:
        if self.fail:
            raise TransientEndpointError("HTTP 503", status=503)
        texts = [row.text or "" for row in rows]
        self.calls.append(texts)
        out = np.zeros((len(rows), 8), np.float32)
        for i, text in enumerate(texts):
            out[i, len(text) % 8] = 1.0
        return EmbedResult(image=out * np.nan, text=out, scaling_factor=2.0)


def test_probabilities_are_the_scaled_softmax() -> None:
    """p = softmax(exp(s) * image.text^T), rows summing to 1."""
    images = np.array([[1.0, 0.0], [0.6, 0.8]], np.float32)
    texts = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    p = zero_shot(images, texts, 1.0)
    logits = np.e * np.array([[1.0, 0.0], [0.6, 0.8]])
    expected = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(p, expected, rtol=1e-6)
    assert np.isfinite(zero_shot(images, texts, 50.0)).all()  # no overflow at large scales


def test_mismatch_needs_the_margin() -> None:
    """The header's label is a mismatch only when another label beats it by more than margin."""
    labels = ["CT/HEAD", "XR/CHEST"]
    close = judge(np.array([0.55, 0.45]), labels, "XR/CHEST", 0.2)
    assert close.predicted_label == "CT/HEAD" and not close.mismatch and close.checked
    far = judge(np.array([0.8, 0.2]), labels, "XR/CHEST", 0.2)
    assert far.mismatch and far.probabilities == {"CT/HEAD": 0.8, "XR/CHEST": 0.2}
    unknown = judge(np.array([0.8, 0.2]), labels, "US/ABDOMEN", 0.2)
    assert not unknown.checked and not unknown.mismatch


def test_header_label_maps_modality_and_body_part() -> None:
    """CR and DX are both XR for the label; body parts use the cohort normalisation."""
    assert header_label("CR", "Thorax", {"CR": "XR"}, {}) == "XR/CHEST"
    assert header_label("CT", "brain", {"CR": "XR"}, {}) == "CT/HEAD"


def test_prompts_are_fetched_once_and_shared(redis_conn: redis.Redis) -> None:
    """One endpoint call per prompt set; another worker (new object) reads Redis instead."""
    stub = TextStub()
    first = PromptEmbeddings(redis_conn, stub, "http://127.0.0.1:1/score", "d1", PROMPTS)
    vectors, scale = first.get() or (None, None)
    assert vectors is not None and vectors.shape == (2, 8) and scale == 2.0
    assert first.get() is not None
    second = PromptEmbeddings(redis_conn, stub, "http://127.0.0.1:1/score", "d1", PROMPTS)
    assert second.get() is not None
    assert len(stub.calls) == 1 and sorted(stub.calls[0]) == sorted(PROMPTS.values())


def test_cache_is_keyed_by_endpoint_and_deployment(redis_conn: redis.Redis) -> None:
    """Another deployment or endpoint embeds text differently: its prompts are fetched anew."""
    stub = TextStub()
    for url, deployment in [("http://127.0.0.1:1/score", "d1"), ("http://127.0.0.1:1/score", "d2")]:
        PromptEmbeddings(redis_conn, stub, url, deployment, PROMPTS).get()
    PromptEmbeddings(redis_conn, stub, "http://127.0.0.1:2/score", "d1", PROMPTS).get()
    assert len(stub.calls) == 3
    extra = {**PROMPTS, "MR/HEAD": "mri brain axial t2"}
    PromptEmbeddings(redis_conn, stub, "http://127.0.0.1:1/score", "d1", extra).get()
    assert stub.calls[-1] == ["mri brain axial t2"]  # only the missing prompt is asked for


def test_an_endpoint_outage_skips_the_check(redis_conn: redis.Redis) -> None:
    """No label verdict (None) rather than a failed embed job; no retry storm afterwards."""
    stub = TextStub(fail=True)
    prompts = PromptEmbeddings(redis_conn, stub, "http://127.0.0.1:1/score", None, PROMPTS)
    assert prompts.get() is None
    stub.fail = False
    assert prompts.get() is None and stub.calls == []  # waits RETRY_FETCH_AFTER first


@pytest.mark.parametrize("margin", [0.0, 0.5])
def test_a_matching_header_is_never_a_mismatch(margin: float) -> None:
    """When the header's label is the top label there is nothing to flag, at any margin."""
    verdict = judge(np.array([0.1, 0.9]), ["CT/HEAD", "XR/CHEST"], "XR/CHEST", margin)
    assert not verdict.mismatch
