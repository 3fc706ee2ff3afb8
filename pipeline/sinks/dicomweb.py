"""The DICOMweb sink: STOW-RS of our SR/KOS objects through dicomweb-client.

One ``POST {url}/studies`` (multipart/related; type="application/dicom") per ``send``.
dicomweb-client's own retries are turned off: the caller retries with back-off, and two retry
loops would multiply each other. What the answer means (PS3.18 10.5.3):

    200 / 202 with no Failed SOP Sequence               done (warning reasons returned)
    200 / 202 / 400 / 409 listing failed instances,
      every reason 0xA7xx or 0x0213 (out of resources)  TransientPushError
    ... with any other failure reason (0xA9xx, 0xC000,
      0xC122 syntax, 0x0110, 0x0122 SOP class)          PermanentPushError, reasons named
    408, 429, 5xx, timeouts, connection errors (TLS)    TransientPushError (``retry_after``)
    any other 4xx (401, 403 included), other answers    PermanentPushError "HTTP 4xx"
    a 202 (or other 2xx) whose body cannot be read      PermanentPushError; a 200: done

A 202 ("some stored") that names one permanent failure is permanent as a whole: the caller
dead-letters the study version with each failed UID and reason in ``failures``; resending the
instances that were stored is harmless (a SOP Instance UID stored twice is one instance).
Failure reasons share the DIMSE code space and table of :mod:`pipeline.sinks.statuses`: only a
lack of resources is the server's state rather than its verdict on the object. A 401 or 403 is
permanent here (unlike the endpoint's): a STOW server that refuses our token refuses it for
every study, which an operator sees at once in the dead letters.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import Dataset

from pipeline.embed.retry import retry_after_seconds
from pipeline.errors import ConfigError, PermanentPushError, PushError, TransientPushError
from pipeline.sections import DicomWebSinkSettings
from pipeline.sinks.statuses import Outcome, describe, outcome

#: HTTP statuses worth retrying: request timeout, throttling (5xx are all retried).
TRANSIENT_CLIENT_STATUSES = frozenset({408, 429})

#: Error answers whose body may list the failed instances ("none stored, and why").
FAILURE_LIST_STATUSES = frozenset({400, 409})

#: Media types a STOW-RS answer may be parsed from (the XML form is not requested).
_JSON_TYPES = ("application/dicom+json", "application/json")

#: requests' exceptions for a server that could not be reached or did not answer in full.
_UNREACHABLE = (
    requests.Timeout,
    requests.ConnectionError,
    requests.exceptions.ChunkedEncodingError,
)


class DicomWebSink:
    """STOW-RS to one DICOMweb service root (``https://pacs.example/dicom-web``)."""

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        username: str | None = None,
        password: str | None = None,
        timeout: float = 30.0,
        ca_file: Path | None = None,
        session: requests.Session | None = None,
    ) -> None:
        session = session if session is not None else requests.Session()
        session.headers["Accept"] = "application/dicom+json"  # the JSON answer, not XML
        if token is not None:
            session.headers["Authorization"] = f"Bearer {token}"
        elif username is not None:
            session.auth = (username, password or "")
        if ca_file is not None:
            session.verify = str(ca_file)
        # dicomweb-client parses a 2xx answer only when its Content-Type is exactly
        # application/dicom+json; a "; charset=utf-8" would hide the Failed SOP Sequence, so the
        # raw response is kept (per thread: a session may serve several) to read it ourselves.
        self._last = threading.local()
        session.hooks.setdefault("response", []).append(self._keep)
        try:
            self._client = DICOMwebClient(url, session=session, timeout=timeout)
        except ValueError as exc:  # malformed URL or scheme; not quoted: it may hold a password
            raise ConfigError("sinks.dicomweb.url: not an http(s) URL") from exc
        self._client.set_http_retry_params(retry=False)

    def _keep(self, response: requests.Response, *args: Any, **kwargs: Any) -> None:
        self._last.response = response

    @classmethod
    def from_settings(
        cls,
        settings: DicomWebSinkSettings,
        *,
        token: str | None = None,
        password: str | None = None,
        session: requests.Session | None = None,
    ) -> DicomWebSink:
        """The sink of ``[sinks.dicomweb]``; token and password are read by the caller."""
        if settings.url is None:
            raise ConfigError("sinks.dicomweb.url is not set: the DICOMweb sink is off")
        if settings.auth == "bearer" and not token:
            raise ConfigError("sinks.dicomweb: auth bearer, but the token is empty")
        if settings.auth == "basic" and not password:
            raise ConfigError("sinks.dicomweb: auth basic, but the password is empty")
        return cls(
            settings.url,
            token=token if settings.auth == "bearer" else None,
            username=settings.username if settings.auth == "basic" else None,
            password=password if settings.auth == "basic" else None,
            timeout=settings.timeout_seconds,
            ca_file=settings.tls_ca_file,
            session=session,
        )

    def send(self, datasets: Sequence[Dataset]) -> dict[str, int]:
        """Store the data sets in one request; return each stored SOP Instance UID's warning
        reason (0 without one). Raises TransientPushError / PermanentPushError (see module)."""
        if not datasets:
            return {}
        self._last.response = None
        answer: Dataset | None
        try:
            answer = self._client.store_instances(list(datasets))
        except requests.HTTPError as exc:
            _raise_for_http_error(exc.response)
        except _UNREACHABLE as exc:  # refused, reset, TLS, timed out, cut short
            raise TransientPushError(f"STOW-RS unreachable ({type(exc).__name__})") from exc
        except requests.JSONDecodeError:
            answer = None  # a 2xx whose body is not JSON: judged below by its status
        except (requests.RequestException, ValueError, TypeError, AttributeError, KeyError) as exc:
            # a malformed URL, an unencodable data set, an answer off the standard
            raise PermanentPushError(f"STOW-RS request failed ({type(exc).__name__})") from exc
        response: requests.Response | None = getattr(self._last, "response", None)
        status = response.status_code if response is not None else 200
        if (answer is None or len(answer) == 0) and response is not None:
            answer = _parse(response)
        if answer is None:
            if status == 200:  # PS3.18: 200 is "every instance stored"; the body only details it
                return {}
            raise PermanentPushError(
                f"STOW-RS answered HTTP {status} with an unreadable body", status=status
            )
        failures = failed_instances(answer)
        if failures:
            raise _failed(failures, status=status)
        return {
            str(item.get("ReferencedSOPInstanceUID", "")): int(item.get("WarningReason", 0))
            for item in answer.get("ReferencedSOPSequence", [])
        }


def failed_instances(answer: Dataset) -> dict[str, int]:
    """SOP Instance UID -> Failure Reason for each item of the Failed SOP Sequence (0008,1198);
    a reason missing is read as 0x0110 (processing failure)."""
    return {
        str(item.get("ReferencedSOPInstanceUID", f"#{index}")): int(
            item.get("FailureReason", 0x0110)
        )
        for index, item in enumerate(answer.get("FailedSOPSequence", []))
    }


def _failed(failures: Mapping[str, int], *, status: int | None) -> PushError:
    """One error for a Failed SOP Sequence: transient only when every reason is transient."""
    transient = all(outcome(reason) is Outcome.TRANSIENT for reason in failures.values())
    reasons = sorted({describe(reason) for reason in failures.values()})
    http = f"HTTP {status}, " if status is not None else ""
    message = f"STOW-RS ({http}{len(failures)} instance(s) failed): " + "; ".join(reasons)
    error = TransientPushError if transient else PermanentPushError
    return error(message, status=status, failures=failures)


def _raise_for_http_error(response: requests.Response | None) -> NoReturn:
    if response is None:
        raise TransientPushError("STOW-RS failed without an answer")
    status = response.status_code
    answer = _parse(response) if status in FAILURE_LIST_STATUSES else None
    failures = failed_instances(answer) if answer is not None else {}
    if failures:
        raise _failed(failures, status=status)
    message = f"STOW-RS answered HTTP {status}"
    if status >= 500 or status in TRANSIENT_CLIENT_STATUSES:
        raise TransientPushError(
            message, status=status, retry_after=retry_after_seconds(response.headers)
        )
    raise PermanentPushError(message, status=status)


def _parse(response: requests.Response) -> Dataset | None:
    """The DICOM JSON body of an answer: empty when there is none, None when it is unreadable
    (not JSON, or another media type despite our Accept)."""
    if not response.content:
        return Dataset()
    content_type = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
    if content_type not in _JSON_TYPES:
        return None
    try:
        document: Any = response.json()
        return Dataset.from_json(document)
    except (ValueError, TypeError, KeyError, AttributeError):
        return None
