"""The ingest benchmark's pynetdicom reference: a bare Storage SCP that only writes
``event.encoded_dataset()`` to a file — no fsync, no parsing, no hand-off, pynetdicom's defaults.

It is what pynetdicom itself costs on this machine, so ``bench.ingest`` can say how much of the
gap to DCMTK's ``storescp`` is pynetdicom's and how much is ours.

    .venv/bin/python -m bench.bare_scp PORT DIRECTORY
"""

from __future__ import annotations

import sys
from pathlib import Path

from pynetdicom import AE, evt
from pynetdicom.events import Event
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from dicom_listener.server import TRANSFER_SYNTAXES


def main() -> None:
    port, out = int(sys.argv[1]), Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)

    def store(event: Event) -> int:
        name = str(event.request.AffectedSOPInstanceUID)  # type: ignore[union-attr]
        (out / name).write_bytes(event.encoded_dataset())
        return 0x0000

    ae = AE(ae_title="PACS_EMBED")
    ae.add_supported_context(CTImageStorage, TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification)  # the benchmark's C-ECHO: it is listening
    ae.start_server(("127.0.0.1", port), evt_handlers=[(evt.EVT_C_STORE, store)], block=True)


if __name__ == "__main__":
    main()
