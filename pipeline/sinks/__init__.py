"""The sinks: how results leave pacs-embed. Transports only; what to push and when is the
caller's (study versions, exactly-once bookkeeping, retries, dead letters).

    dicom.DicomSink        C-STORE (pynetdicom SCU), one association per call, optional TLS
    dicomweb.DicomWebSink  STOW-RS (dicomweb-client), bearer or basic auth
    webhook.WebhookSink    a JSON POST signed ``X-PacsEmbed-Signature: sha256=<HMAC hex>``
    statuses               DIMSE statuses / STOW failure reasons -> done, retry or dead letter

Each ``send`` returns when the peer took everything, or raises ``TransientPushError`` (retry
with back-off) or ``PermanentPushError`` (dead-letter; the message is the reason, UIDs and
statuses only). Nothing is imported here, so using one sink does not load the others' clients.
"""
