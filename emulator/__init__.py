"""A local stand-in for the MedImageInsight endpoint (`pacs-embed emulator`). NOT A MEDICAL MODEL.

It speaks the same HTTP contract (docs/architecture.md §7), checks the key and misbehaves on
purpose (latency, capacity, error rates, hangs, truncated bodies, cold start:
``emulator.faults``), but its embeddings are deterministic functions of pixels and words (see
``emulator.model``), useful only for running and testing pacs-embed without Azure. Never read
clinical meaning into them.
"""

from emulator.faults import FaultPlan
from emulator.model import SCALING_FACTOR
from emulator.server import EMULATOR_HEADER, EMULATOR_HEADER_VALUE, EmulatorServer, EmulatorSettings

__all__ = [
    "EMULATOR_HEADER",
    "EMULATOR_HEADER_VALUE",
    "SCALING_FACTOR",
    "EmulatorServer",
    "EmulatorSettings",
    "FaultPlan",
]
