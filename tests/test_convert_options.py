"""Conversion options: per-modality rules, VOI choice, series sampling, settings, skips."""

from __future__ import annotations

import concurrent.futures as cf
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom.dataset import Dataset

from dicom_listener.dispatcher import Dispatcher
from pipeline.convert import ConvertOptions, ModalityRule, convert_file, render_frame
from pipeline.convert.header import pick_window
from pipeline.convert.options import series_skip_reason
from pipeline.errors import (
    ConfigError,
    ConversionError,
    NoPixelDataError,
    NotSampledError,
    SkippedError,
)
from pipeline.settings import ConvertSettings, Settings
from tests import factory

NATIVE = ConvertOptions(size=0)


def _ct(instance_number: int = 1, **changes: Any) -> Dataset:
    ds = factory.ct_slice(
        study_uid="1.2.3", series_uid="1.2.4", instance_number=instance_number, rows=32, columns=32
    )
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    return ds


def _no_voi(ds: Dataset) -> Dataset:
    del ds.WindowCenter, ds.WindowWidth, ds.WindowCenterWidthExplanation
    return ds


# --- VOI choice -------------------------------------------------------------------------------


def test_pick_window_by_explanation_then_index_then_first() -> None:
    """An explanation match wins (case-insensitive); else the index; else the first pair."""
    explanations = ["MEDIASTINUM", "LUNG", "BONE"]
    assert pick_window(3, explanations, 0, "lung") == 1
    assert pick_window(3, explanations, 2, "BRAIN") == 2
    assert pick_window(3, explanations, 7, None) == 0
    assert pick_window(2, explanations, 0, "BONE") == 0  # the third explanation has no pair


def test_window_explanation_from_a_modality_rule_selects_the_pair() -> None:
    """[convert.modality.CT] window_explanation = "LUNG" renders the LUNG pair, not the first."""
    ds = _ct(WindowCenter=[40, -600], WindowWidth=[400, 1500])
    ds.WindowCenterWidthExplanation = ["MEDIASTINUM", "LUNG"]
    lung = render_frame(ds, 0, ConvertOptions(size=0, window_index=1))
    rule = ConvertOptions(size=0, modality={"CT": ModalityRule(window_explanation="LUNG")})
    assert np.array_equal(render_frame(ds, 0, rule), lung)
    assert not np.array_equal(render_frame(ds, 0, NATIVE), lung)


def test_preset_applies_only_without_header_voi() -> None:
    """A modality's preset window is used when the header has none, and never over the header."""
    preset = ConvertOptions(size=0, modality={"CT": ModalityRule(preset_window=(40, 400))})
    with_header = _ct()
    assert np.array_equal(render_frame(_no_voi(_ct()), 0, preset), render_frame(with_header, 0))
    wide = _ct(WindowCenter=500, WindowWidth=3000)
    assert np.array_equal(render_frame(wide, 0, preset), render_frame(wide, 0, NATIVE))


def test_other_modalities_keep_the_percentile_stretch() -> None:
    """A CT preset does not touch an MR without VOI: that one is stretched."""
    preset = ConvertOptions(size=0, modality={"CT": ModalityRule(preset_window=(40, 400))})
    mr = _no_voi(_ct(Modality="MR"))
    assert np.array_equal(render_frame(mr, 0, preset), render_frame(mr, 0, NATIVE))
    assert render_frame(mr, 0, preset).max() == 255 and render_frame(mr, 0, preset).min() == 0


def test_for_modality_overrides_field_by_field() -> None:
    """A rule replaces only what it sets; unknown modalities get the global options."""
    options = ConvertOptions(
        frame_policy="all", modality={"US": ModalityRule(frame_policy="max_k", frame_param=4)}
    )
    us = options.for_modality(" us ")
    assert (us.frame_policy, us.frame_param, us.size, us.modality) == ("max_k", 4, 512, {})
    assert options.for_modality("CT").frame_policy == "all"


@pytest.mark.parametrize(
    "rule",
    [
        {"frame_policy": "first"},
        {"series_param": 0},
        {"preset_window": (40.0, 0.5)},
        {"window_index": -1},
    ],
)
def test_bad_modality_rules_fail_at_construction(rule: dict[str, Any]) -> None:
    """An impossible rule raises ConfigError when built, naming the setting."""
    with pytest.raises(ConfigError, match="convert"):
        ModalityRule(**rule)


def test_modality_codes_ignore_case_and_conflicts_are_refused() -> None:
    """Rule codes are normalised ("ct" is CT); one key set two ways, or a malformed code, is not."""
    assert (
        ConvertOptions(modality={"ct": ModalityRule(frame_param=2)}).for_modality("CT").frame_param
        == 2
    )
    with pytest.raises(ConfigError, match="twice"):
        ConvertOptions(
            modality={"CT": ModalityRule(frame_param=2), "ct": ModalityRule(frame_param=3)}
        )
    with pytest.raises(ConfigError, match="not a DICOM Modality code"):
        ConvertOptions(modality={"C T": ModalityRule()})


# --- series sampling --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("number", "size", "policy", "param", "kept"),
    [
        (5, None, "all", 1, True),
        (1, None, "every_n", 3, True),
        (4, None, "every_n", 3, True),
        (5, None, "every_n", 3, False),
        (None, None, "every_n", 3, True),  # no Instance Number: cannot place it, keep
        (6, 11, "middle", 1, True),
        (5, 11, "middle", 1, False),
        (5, None, "middle", 1, True),  # no series size: keep
        (12, 11, "middle", 1, True),  # numbering beyond the size: keep
        (1, 10, "max_k", 4, True),
        (10, 10, "max_k", 4, True),
        (2, 10, "max_k", 4, False),
    ],
)
def test_series_skip_reason(
    number: int | None, size: int | None, policy: str, param: int, kept: bool
) -> None:
    """Series sampling keeps or leaves out an instance from its own header numbers."""
    reason = series_skip_reason(number, size, policy, param)
    assert (reason is None) == kept
    if reason is not None:
        assert reason.startswith("not sampled") and str(number) in reason


def test_convert_file_skips_unsampled_slices(tmp_path: Path) -> None:
    """A CT every_n 2 rule: slice 2 raises NotSampledError (a skip), slice 3 converts."""
    options = ConvertOptions(modality={"CT": ModalityRule(series_policy="every_n", series_param=2)})
    with pytest.raises(NotSampledError, match="every_n 2"):
        convert_file(factory.write(_ct(2), tmp_path / "2.dcm"), options)
    assert len(convert_file(factory.write(_ct(3), tmp_path / "3.dcm"), options).pngs) == 1


def test_skips_are_not_conversion_errors(tmp_path: Path) -> None:
    """Skips share SkippedError and are not ConversionErrors, so nothing quarantines them."""
    assert issubclass(NotSampledError, SkippedError) and issubclass(NoPixelDataError, SkippedError)
    assert not issubclass(SkippedError, ConversionError)
    with pytest.raises(NoPixelDataError):
        convert_file(factory.write(factory.basic_text_sr(), tmp_path / "sr.dcm"))


class _Ledger:
    def __init__(self) -> None:
        self.calls: list[tuple[str, ...]] = []

    def skipped(self, sop_uid: str, reason: str) -> None:
        self.calls.append(("skipped", sop_uid, reason))

    def failed(self, sop_uid: str, stage: str, reason: str) -> None:
        self.calls.append(("failed", sop_uid, reason))


class _Spool:
    def quarantine(self, sop_uid: str, path: Path, reason: str) -> None:
        raise AssertionError("a skipped instance must not be quarantined")


@pytest.mark.parametrize("error", [NotSampledError("not sampled: x"), NoPixelDataError("no PD")])
def test_dispatcher_settles_skips_as_skipped(error: SkippedError) -> None:
    """The dispatcher records a SkippedError as state "skipped" with its reason."""
    dispatcher = object.__new__(Dispatcher)
    dispatcher.ledger = _Ledger()  # type: ignore[assignment]
    dispatcher.spool = _Spool()  # type: ignore[assignment]
    future: cf.Future[Any] = cf.Future()
    future.set_exception(error)
    dispatcher._settle(Path("1.2.3.dcm"), future)
    assert dispatcher.ledger.calls == [("skipped", "1.2.3", str(error))]  # type: ignore[attr-defined]


# --- settings ---------------------------------------------------------------------------------


def test_settings_defaults_are_the_pipeline_defaults() -> None:
    """[convert] defaults build exactly ConvertOptions(): the options are the section."""
    assert ConvertOptions.from_settings(Settings.load()) == ConvertOptions()
    assert ConvertOptions.from_settings(Settings.load(), native_size=True).size == 0
    aliases = Settings.load(detect={"body_part_aliases": {"BRUSTKORB": "CHEST"}})
    assert ConvertOptions.from_settings(aliases).body_part_aliases == {"BRUSTKORB": "CHEST"}
    assert isinstance(ConvertOptions(), ConvertSettings)


def test_settings_modality_section_reaches_the_options(tmp_path: Path) -> None:
    """A [convert.modality.ct] TOML section becomes a CT rule (codes are case-insensitive)."""
    config = tmp_path / "c.toml"
    config.write_text(
        '[convert.modality.ct]\nwindow_explanation = "LUNG"\npreset_window = [-600, 1500]\n'
        'series_policy = "every_n"\nseries_param = 3\n'
    )
    ct = ConvertOptions.from_settings(Settings.load(config)).for_modality("CT")
    assert (ct.window_explanation, ct.preset_window) == ("LUNG", (-600.0, 1500.0))
    assert (ct.series_policy, ct.series_param) == ("every_n", 3)


def test_settings_env_and_toml_merge_per_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An env var (lower-cased code) adds a key to the TOML's CT rule; a conflict is refused."""
    config = tmp_path / "c.toml"
    config.write_text('[convert.modality.CT]\nwindow_explanation = "LUNG"\n')
    monkeypatch.setenv("PACS_EMBED_CONVERT__MODALITY__CT__FRAME_POLICY", "all")
    ct = ConvertOptions.from_settings(Settings.load(config)).for_modality("CT")
    assert (ct.window_explanation, ct.frame_policy) == ("LUNG", "all")
    monkeypatch.setenv("PACS_EMBED_CONVERT__MODALITY__CT__WINDOW_EXPLANATION", "BONE")
    with pytest.raises(ConfigError, match="set twice"):
        Settings.load(config)


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[convert.modality.CT]\npreset_window = [40, 0]\n", "preset_window"),
        ('[convert.modality.CT]\nframe_policy = "first"\n', "convert.modality.CT.frame_policy"),
        ('[convert.modality."C T"]\n', "not a DICOM Modality code"),
        ("[convert]\npercentiles = [99, 1]\n", "percentiles"),
        ("[convert]\npreset_window = [40, 400]\n", "convert.preset_window: .*per modality"),
        ("[convert]\nmax_decoded_bytes = 0\n", "convert.max_decoded_bytes"),
    ],
)
def test_bad_convert_settings_stop_start_up(tmp_path: Path, toml: str, message: str) -> None:
    """Invalid [convert] settings raise ConfigError at load, naming the setting."""
    config = tmp_path / "c.toml"
    config.write_text(toml)
    with pytest.raises(ConfigError, match=message):
        Settings.load(config)
