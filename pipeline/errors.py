"""Every exception pacs-embed raises on purpose, in one tree.

Each boundary raises its own type so the caller that owns the outcome (the C-STORE handler, the
embed job, the CLI) maps it in one place: to a DICOM status, to "retry" or to "quarantine".

    PacsEmbedError
    ├── ConfigError                  settings that cannot work; raised at start-up only
    ├── SpoolError                   the spool cannot take an instance (disk full, unwritable)
    ├── ConversionError              this object cannot become a PNG; permanent -> quarantine
    ├── SkippedError                 deliberately not embedded; final state "skipped" + reason
    │   ├── NoPixelDataError         SR, KOS, presentation state...: nothing to embed
    │   ├── NotEmbeddedError         not an image by Modality or SOP Class (SEG, RT Dose...)
    │   └── NotSampledError          left out by the modality's series sampling policy
    ├── EndpointError                the MedImageInsight endpoint did not give us embeddings
    │   ├── TransientEndpointError   408/429/5xx, timeouts, refused connections, a 2xx body
    │   │   │                        cut short, no in-flight slot before the deadline: retry later
    │   │   └── EndpointAuthError    401/403: our credentials, not the images, are at fault; not
    │   │                            retried within the call, but the job retries later
    │   └── PermanentEndpointError   other 4xx, model errors (424), answers off-contract: quarantine
    │       └── ResponseFormatError  the answer does not fit the contract (shape, count, NaN)
    └── PushError                    a sink (pipeline/sinks) did not take a result
        ├── TransientPushError       refused/aborted association, 0xA7xx, 408/429/5xx, timeouts,
        │                            refused connections: retry with back-off
        └── PermanentPushError       0xA9xx/0xCxxx, other 4xx, a failed STOW instance: dead letter
"""

from __future__ import annotations

from collections.abc import Mapping


class PacsEmbedError(Exception):
    """Root of every error raised on purpose by pacs-embed."""


class ConfigError(PacsEmbedError):
    """Settings that cannot work; the message names the setting and what is wrong with it."""


class SpoolError(PacsEmbedError):
    """An instance could not be made durable in the spool."""


class ConversionError(PacsEmbedError):
    """An image object cannot be turned into the endpoint's PNG input.

    The message is one human-readable line, the quarantine reason an operator reads (e.g. "JPEG
    Extended 12-bit: no decoder could read the stream"); ``detail`` holds what only a developer
    needs (each decoder's own error), shown apart from the reason. Neither may quote a value
    from the data set: they end up in logs and Redis.
    """

    def __init__(self, message: str, *, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail


class SkippedError(PacsEmbedError):
    """The object is fine but is not to be embedded: a final state, not a failure.

    Not a ConversionError on purpose: nothing is wrong with the object, so it is never
    quarantined and never counted as a failure; the message is the reason shown in ``/status``.
    """


class NoPixelDataError(SkippedError):
    """The object has no pixel data (SR, KOS, presentation state, ...), so nothing to embed."""


class NotEmbeddedError(SkippedError):
    """The object's Modality or SOP Class is not one to embed (``convert.embed_modalities``)."""


class NotSampledError(SkippedError):
    """The series sampling policy of the object's modality leaves this instance out."""


class EndpointError(PacsEmbedError):
    """The endpoint did not return usable embeddings.

    ``status`` is the HTTP status when there was one; ``retry_after`` the server's hint in seconds.
    """

    def __init__(
        self, message: str, *, status: int | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


class TransientEndpointError(EndpointError):
    """Worth retrying: throttling, overload, cold start, timeouts, dropped connections, a body
    cut short, or no fleet-wide in-flight slot (or Redis for it) before the deadline."""


class EndpointAuthError(TransientEndpointError):
    """The endpoint refused our key or token (401/403).

    Retrying the same request at once will not help, and quarantining the images would punish
    them for a configuration error: the job is retried over its back-off while the key is fixed.
    """


class PermanentEndpointError(EndpointError):
    """Retrying will not help; the message is the server's own and becomes the quarantine reason."""


class ResponseFormatError(PermanentEndpointError):
    """The answer breaks the contract: a short or malformed answer is an error, not a shift."""


class PushError(PacsEmbedError):
    """A sink did not take what was pushed to it; the caller retries or dead-letters.

    The message is the reason an operator reads in the dead letter: statuses, UIDs and counts,
    never a value from a data set or a response body that could quote one. ``status`` is the
    HTTP or DIMSE status when the peer answered; ``retry_after`` the peer's hint in seconds;
    ``failures`` maps each refused SOP Instance UID to its status (DIMSE or STOW failure reason).
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        retry_after: float | None = None,
        failures: Mapping[str, int] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after
        self.failures: Mapping[str, int] = dict(failures or {})


class TransientPushError(PushError):
    """Worth retrying with back-off: the peer is busy, down, unreachable or out of resources, or
    refused our association (a configuration the operator can fix without touching the data)."""


class PermanentPushError(PushError):
    """Sending the same thing again will not help: dead-letter it with the message as reason."""
