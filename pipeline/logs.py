"""structlog set-up: one JSON object per line, and never a patient's identity in it.

We log UIDs and counts. The PHI filter below is the second line of defence: code should not hand a
patient name to a logger in the first place, but if it does, the value never reaches the sink.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

#: Event keys whose values are patient data (DICOM keywords and the snake_case we would use).
PHI_KEYS = frozenset(
    {
        "PatientName",
        "patient_name",
        "PatientID",
        "patient_id",
        "PatientBirthDate",
        "patient_birth_date",
        "birth_date",
        "AccessionNumber",
        "accession_number",
        "accession",
        "OtherPatientIDs",
        "PatientAddress",
        "ReferringPhysicianName",
    }
)
REDACTED = "[redacted]"


def drop_phi(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> Any:
    """structlog processor: replace the value of any PHI-named key."""
    for key in PHI_KEYS.intersection(event_dict):
        event_dict[key] = REDACTED
    return event_dict


def configure(level: str = "info", fmt: str = "json") -> None:
    """Configure structlog and the stdlib root logger (pynetdicom and rq log through it)."""
    numeric = logging.getLevelName(level.upper())
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        drop_phi,
    ]
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    # pynetdicom logs every PDU at INFO, including the peer's identifiers in some dumps:
    # keep it at WARNING unless we are debugging.
    logging.getLogger("pynetdicom").setLevel(max(numeric, logging.WARNING))
    # httpx logs every request at INFO; our client logs retries and failures itself.
    logging.getLogger("httpx").setLevel(max(numeric, logging.WARNING))
