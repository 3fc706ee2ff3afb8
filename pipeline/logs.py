"""structlog set-up: one JSON object per line, and never a patient's identity in it.

We log UIDs and counts. The PHI filter below is the second line of defence: code should not hand a
patient name to a logger in the first place, but if it does, the value never reaches the sink.

Libraries are the third risk: pydicom's validation warnings and pynetdicom's errors quote the
values they complain about, and an element whose declared length overruns swallows the next
elements — a "UID" that holds the patient's name and birth date. Filtering by key cannot catch
that, so warnings are captured into the structured log (never printed raw on stderr) and every
library message has its quoted text withheld (:func:`withhold_quoted`) before it is rendered.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import pydicom.config
import structlog

from pipeline.phi import PHI_KEYWORDS

#: Event keys whose values are patient data (DICOM keywords and the snake_case we would use).
PHI_KEYS = frozenset(
    {
        *PHI_KEYWORDS,
        "patient_name",
        "patient_id",
        "patient_birth_date",
        "birth_date",
        "accession_number",
        "accession",
        "ReferringPhysicianName",
    }
)
REDACTED = "[redacted]"
WITHHELD = "'<withheld>'"

#: Quoted text in a library's message: '...', "...", b'...' (values, as pydicom quotes them).
_QUOTED = re.compile(r"""b?'[^']*'?|b?"[^"]*"?""")

#: A library message is cut here: long ones dump elements or whole data sets.
MAX_LIBRARY_MESSAGE = 200


def withhold_quoted(message: str, limit: int = MAX_LIBRARY_MESSAGE) -> str:
    """A library's message with every quoted value withheld and its length bounded."""
    return _QUOTED.sub(WITHHELD, message)[:limit]


class LibraryMessages(logging.Filter):
    """Withholds quoted values from records that do not come from our own code."""

    OURS = ("pipeline", "dicom_listener", "workers", "pacs_embed", "emulator")

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(self.OURS):
            record.msg = withhold_quoted(record.getMessage())
            record.args = ()
        return True


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
    handler.addFilter(LibraryMessages())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    # Warnings go to the "py.warnings" logger, through the filter above, not raw to stderr.
    logging.captureWarnings(True)
    quiet_pydicom()
    # pynetdicom logs every PDU at INFO, including the peer's identifiers in some dumps:
    # keep it at WARNING unless we are debugging.
    logging.getLogger("pynetdicom").setLevel(max(numeric, logging.WARNING))
    # httpx logs every request at INFO; our client logs retries and failures itself.
    logging.getLogger("httpx").setLevel(max(numeric, logging.WARNING))
    # pynetdicom warns about every non-conformant UID; the listener logs uid.nonconformant.
    logging.getLogger("pynetdicom.utils").setLevel(max(numeric, logging.ERROR))


def quiet_pydicom() -> None:
    """Stop pydicom validating values as it reads: the warnings quote the value (possibly a
    swallowed patient module), and the checks that matter are ours (pipeline/vocabulary, uids).
    Called in every process that reads data sets: `run`, listeners, conversion processes."""
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
