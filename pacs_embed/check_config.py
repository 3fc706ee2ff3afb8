"""`pacs-embed check-config [FILE]`: load the settings as every command does (defaults < FILE <
``PACS_EMBED_*`` env vars), and print the effective settings, secrets masked.

The output is TOML (``--json``: a JSON object): every section and key, a key that is unset as a
comment (``# url: unset``). A secret that is set — endpoint key, admin token, emulator key, the
sinks' token, password and webhook secret (``pipeline.settings.SECRET_KEYS``), any other
``SecretStr`` field — is printed as ``"***"``, and so is the password of a URL (a Redis URL's,
say). A ``*_file`` setting is printed as its path: no secret file is read.

Invalid settings exit 2 with the ``ConfigError`` lines, each naming its key, on stderr.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, SecretStr

from pacs_embed.compose import check_endpoint_auth
from pipeline.errors import ConfigError
from pipeline.settings import SECRET_KEYS, Settings

MASK = "***"
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def run(config_file: Path | None, *, as_json: bool = False) -> int:
    """Load, check and print; the exit status (0 valid, 2 invalid)."""
    try:
        settings = Settings.load(config_file)
        consistent(settings)
    except ConfigError as exc:
        print(f"pacs-embed: {exc}", file=sys.stderr)
        return 2
    effective = masked(settings)
    if as_json:
        print(json.dumps(effective, indent=2))
    else:
        source = f"defaults < {config_file} < env" if config_file else "defaults < env"
        print(f"# pacs-embed effective settings ({source}); secrets shown as {MASK}")
        print(to_toml(effective), end="")
    return 0


def consistent(settings: Settings) -> None:
    """What a command would refuse later although each key is valid on its own: the endpoint's
    auth against the key it is given (checked without reading a key file)."""
    ep = settings.endpoint
    if ep.url:
        check_endpoint_auth(ep.auth, has_key=ep.key is not None or ep.key_file is not None)


def masked(settings: Settings) -> dict[str, Any]:
    """The settings as plain data (JSON types), every secret that is set as :data:`MASK`."""
    data: dict[str, Any] = _plain(settings)
    for section, key in SECRET_KEYS:  # masked by _plain already; this guards a str-typed one
        table: Any = data
        for part in section.split("."):
            table = table.get(part) if isinstance(table, dict) else None
        if isinstance(table, dict) and table.get(key) is not None:
            table[key] = MASK
    return data


def _plain(value: Any) -> Any:
    if isinstance(value, SecretStr):
        return MASK
    if isinstance(value, BaseModel):
        return {name: _plain(getattr(value, name)) for name in type(value).model_fields}
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_plain(item) for item in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, str):
        return _mask_url_password(value)
    return value


def _mask_url_password(value: str) -> str:
    """``redis://:pw@host/0`` -> ``redis://:***@host/0``; any other text as it is."""
    if "://" not in value or "@" not in value:
        return value
    try:
        parts = urlsplit(value)
        password = parts.password
    except ValueError:
        return value
    if not password:
        return value
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:{MASK}@{host}"))


# -- TOML --------------------------------------------------------------------------------------


def to_toml(data: Mapping[str, Any]) -> str:
    """``data`` as TOML: scalars and lists as ``key = value``, tables as ``[a.b]``; None (no
    TOML value) as a comment."""
    lines: list[str] = []
    _table(lines, [], data)
    return "\n".join(lines) + "\n"


def _table(lines: list[str], path: list[str], table: Mapping[str, Any]) -> None:
    scalars = [(k, v) for k, v in table.items() if not isinstance(v, Mapping)]
    tables = [(k, v) for k, v in table.items() if isinstance(v, Mapping)]
    if path and (scalars or not tables):
        if lines:
            lines.append("")
        lines.append(f"[{'.'.join(_key(part) for part in path)}]")
    for key, value in scalars:
        if value is None:
            lines.append(f"# {key}: unset")
        else:
            lines.append(f"{_key(key)} = {_value(value)}")
    for key, value in tables:
        _table(lines, [*path, key], value)


def _key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else json.dumps(key)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        # a JSON string is a TOML basic string, once DEL is escaped too
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list):
        return "[" + ", ".join(_value(item) for item in value if item is not None) + "]"
    if isinstance(value, Mapping):  # a table inside an array
        inner = ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items() if v is not None)
        return "{ " + inner + " }" if inner else "{}"
    return json.dumps(str(value))
