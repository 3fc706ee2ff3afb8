"""Zero-shot label check: does the picture agree with the header's modality and body part?

Each label (``XR/CHEST``) has a prompt in the ``<modality> <anatomy> <view/params>`` pattern
(``x-ray chest posteroanterior``). The prompts' text embeddings are fetched from the endpoint
once and cached in Redis under the endpoint URL + deployment (another model embeds text
differently) and the prompt text, so every worker on every host shares one fetch. Then

    probabilities = softmax(exp(scaling_factor) * image @ text.T)

over all labels, and the header's label is a mismatch when another label beats it by more than
``margin``. The header label uses the cohort normalisation (``Thorax`` -> ``CHEST``) and a
modality map (``CR``, ``DX`` -> ``XR``): radiographs look alike whichever detector made them.

With the local emulator this check measures nothing: its text and image vectors live in
unrelated spaces (see emulator/model.py).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Protocol, cast

import numpy as np
import redis
import structlog

from pipeline.detect.scoring import Doubles, Floats, unit_rows
from pipeline.embed.contract import EmbedResult, Row
from pipeline.errors import EndpointError
from pipeline.keys import prompt_cache_key
from pipeline.verdicts import LabelVerdict
from pipeline.vocabulary import normalise_body_part, normalise_modality

log = structlog.get_logger(__name__)

#: MedImageInsight's published log-scale temperature, for an endpoint that does not return one.
DEFAULT_SCALING_FACTOR = 4.51

#: After a failed prompt fetch, wait this long before asking the endpoint again (seconds); the
#: images in between get no label verdict rather than a stalled or failed embed job.
RETRY_FETCH_AFTER = 300.0

_SCALE_FIELD = "__scaling_factor__"


class TextEmbedder(Protocol):
    def embed(self, rows: Sequence[Row]) -> EmbedResult: ...


def header_label(
    modality: str, body_part: str, modalities: Mapping[str, str], aliases: Mapping[str, str]
) -> str:
    """``CR`` + ``Thorax`` -> ``XR/CHEST``."""
    mod = normalise_modality(modality)
    return f"{modalities.get(mod, mod)}/{normalise_body_part(body_part, aliases)}"


def zero_shot(images: Floats, texts: Floats, scaling_factor: float) -> Doubles:
    """Row-wise softmax of ``exp(scaling_factor) * images @ texts.T`` (numerically stable)."""
    logits = np.exp(scaling_factor) * (images.astype(np.float64) @ texts.astype(np.float64).T)
    logits -= logits.max(axis=1, keepdims=True)
    weights = np.exp(logits)
    out: Doubles = weights / weights.sum(axis=1, keepdims=True)
    return out


def judge(
    probabilities: Doubles, labels: Sequence[str], header: str, margin: float
) -> LabelVerdict:
    """The verdict for one image's probability row."""
    top = int(np.argmax(probabilities))
    checked = header in labels
    beaten_by = float(probabilities[top] - probabilities[labels.index(header)]) if checked else 0.0
    return LabelVerdict(
        header_label=header,
        predicted_label=labels[top],
        probabilities={
            label: round(float(p), 4) for label, p in zip(labels, probabilities, strict=True)
        },
        margin=margin,
        checked=checked,
        mismatch=checked and labels[top] != header and beaten_by > margin,
    )


class PromptEmbeddings:
    """The prompts' text embeddings and the scaling factor: memory, else Redis, else endpoint."""

    def __init__(
        self,
        connection: redis.Redis,
        client: TextEmbedder,
        endpoint_url: str,
        deployment: str | None,
        prompts: Mapping[str, str],
    ) -> None:
        self.redis = connection
        self.client = client
        self.key = prompt_cache_key(endpoint_url, deployment)
        self.labels = sorted(prompts)
        self.texts = [prompts[label] for label in self.labels]
        self._loaded: tuple[Floats, float] | None = None
        self._retry_at = 0.0

    def get(self) -> tuple[Floats, float] | None:
        """(labels x dim unit vectors, scaling factor); None while the endpoint cannot say."""
        if self._loaded is not None:
            return self._loaded
        if time.monotonic() < self._retry_at:
            return None
        cached = self.redis.hmget(self.key, [*self.texts, _SCALE_FIELD])
        missing = [text for text, raw in zip(self.texts, cached[:-1], strict=True) if raw is None]
        if missing:
            try:
                self._fetch(missing)
            except EndpointError as exc:
                self._retry_at = time.monotonic() + RETRY_FETCH_AFTER
                log.warning("labels.unavailable", error=type(exc).__name__, status=exc.status)
                return None
            cached = self.redis.hmget(self.key, [*self.texts, _SCALE_FIELD])
        vectors = unit_rows(
            np.stack([np.frombuffer(cast(bytes, raw), dtype="<f4") for raw in cached[:-1]])
        )
        scale = float(cached[-1]) if cached[-1] is not None else DEFAULT_SCALING_FACTOR
        self._loaded = (vectors, scale)
        return self._loaded

    def _fetch(self, texts: list[str]) -> None:
        result = self.client.embed([Row(text=text) for text in texts])
        mapping: dict[str, bytes | str] = {
            text: np.asarray(vector, dtype="<f4").tobytes()
            for text, vector in zip(texts, result.text, strict=True)
        }
        if result.scaling_factor is not None:
            mapping[_SCALE_FIELD] = repr(result.scaling_factor)
        self.redis.hset(self.key, mapping=mapping)  # type: ignore[arg-type]
        log.info("labels.fetched", prompts=len(texts))
