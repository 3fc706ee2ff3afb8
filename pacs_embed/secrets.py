"""Secrets the daemon makes for itself when none were configured (admin token, emulator key)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def ensure_secret_file(path: Path) -> str:
    """Read the secret at ``path``, creating it (0600, random) on first use."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(secrets.token_urlsafe(32))
    return path.read_text(encoding="utf-8").strip()
