"""[detect] settings: the calibration arithmetic is checked at start-up, with a clear message."""

from __future__ import annotations

import os

import pytest

from pipeline.errors import ConfigError
from pipeline.settings import Settings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("PACS_EMBED_"):
            monkeypatch.delenv(name)


def test_min_reference_below_one_over_alpha_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """min_reference 50 at alpha 0.01 could never flag anything: start-up fails and says why."""
    monkeypatch.setenv("PACS_EMBED_DETECT__MIN_REFERENCE", "50")
    with pytest.raises(
        ConfigError,
        match=r"detect: .*min_reference \(50\) must be at least "
        r"1/alpha \(100 for alpha 0\.01\).*1/\(n\+1\)",
    ):
        Settings.load()


@pytest.mark.parametrize(
    ("alpha", "min_reference", "ok"),
    [("0.01", "100", True), ("0.01", "99", False), ("0.05", "20", True), ("0.05", "19", False)],
)
def test_the_boundary_is_one_over_alpha(
    monkeypatch: pytest.MonkeyPatch, alpha: str, min_reference: str, ok: bool
) -> None:
    """Exactly 1/alpha images is enough (p can reach 1/(n+1) < alpha); one fewer is not."""
    monkeypatch.setenv("PACS_EMBED_DETECT__ALPHA", alpha)
    monkeypatch.setenv("PACS_EMBED_DETECT__MIN_REFERENCE", min_reference)
    if ok:
        assert Settings.load().detect.min_reference == int(min_reference)
    else:
        with pytest.raises(ConfigError, match="1/alpha"):
            Settings.load()


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("PACS_EMBED_DETECT__MAX_REFERENCE", "50", "max_reference"),
        ("PACS_EMBED_DETECT__K", "100", "k"),
        ("PACS_EMBED_DETECT__COHORT_FIELDS", '["modality", "patient_name"]', "cohort_fields"),
        ("PACS_EMBED_DETECT__ALPHA", "0", "alpha"),
    ],
)
def test_other_bad_detect_values_name_the_setting(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, message: str
) -> None:
    """A reference cap below the bootstrap, k too large, unknown fields: ConfigError."""
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=message):
        Settings.load()
