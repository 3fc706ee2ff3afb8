"""`pacs-embed reference import|export|list` and `pacs-embed search`, plus the admin routes
`/search` and `/verdicts` that answer the same questions over HTTP.

Kept apart from cli.py so the subcommands' wiring is one place; each builds its objects from the
settings and hands them down (the logic lives in pipeline/detect).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import redis

from pipeline.errors import ConfigError
from pipeline.settings import Settings
from pipeline.uids import is_valid_uid


def add_parsers(sub: Any) -> None:
    """The subcommands, added to cli.py's subparsers."""
    reference = sub.add_parser("reference", help="the per-cohort reference sets")
    ref_sub = reference.add_subparsers(dest="action", required=True)
    imp = ref_sub.add_parser("import", help="replace cohorts' references from a .npz file")
    imp.add_argument("file", type=Path)
    imp.add_argument("--cohort", help="cohort of every row (else the file's 'cohort' array)")
    exp = ref_sub.add_parser("export", help="references as .npz (importable as they are)")
    exp.add_argument("--out", type=Path, required=True)
    exp.add_argument("--cohort", action="append", help="only this cohort (repeatable)")
    ref_sub.add_parser("list", help="cohorts with their size, state and version")
    search = sub.add_parser("search", help="nearest stored images by cosine similarity")
    query = search.add_mutually_exclusive_group(required=True)
    query.add_argument("--sop", help="a stored image's SOP Instance UID")
    query.add_argument("--file", type=Path, help="a DICOM file, converted and embedded now")
    search.add_argument("--top", type=int, default=10)
    search.add_argument("--cohort", help="only images of this cohort, e.g. CR/CHEST")
    search.add_argument("--json", action="store_true", help="print JSON")


def dispatch(args: argparse.Namespace, settings: Settings, connection: redis.Redis) -> int:
    if args.command == "reference":
        return _reference(args, settings, connection)
    return _search(args, settings, connection)


def _references(settings: Settings, connection: redis.Redis) -> Any:
    from pipeline.detect.detector import reference_store

    return reference_store(settings.detect, connection)


def _rule(settings: Settings) -> Any:
    from pipeline.detect.detector import cohort_rule

    return cohort_rule(settings.detect)


def _reference(args: argparse.Namespace, settings: Settings, connection: redis.Redis) -> int:
    from pipeline.detect import transfer

    store = _references(settings, connection)
    if args.action == "import":
        try:
            groups = transfer.read_reference_file(args.file, _rule(settings), args.cohort)
            imported = transfer.import_references(store, groups)
        except ValueError as exc:
            raise ConfigError(f"{args.file}: {exc}") from exc
        for done in imported:
            notes = []
            if done.skipped_flagged:
                notes.append(f"{done.skipped_flagged} flagged rows left out")
            if done.dropped_over_cap:
                notes.append(f"{done.dropped_over_cap} over max_reference left out")
            extra = f" ({'; '.join(notes)})" if notes else ""
            print(f"{done.cohort}: {done.size} vectors, {done.state}, v{done.version}{extra}")
        return 0
    cohorts = store.cohorts()
    if args.action == "list":
        for cohort in cohorts:
            snap = store.snapshot(cohort)
            print(f"{cohort}\t{snap.size}\t{snap.state}\tversion {snap.version}")
        return 0
    chosen = [_rule(settings).parse(c) for c in args.cohort] if args.cohort else cohorts
    count = transfer.write_reference_file(args.out, [store.snapshot(c) for c in chosen])
    print(f"exported {count} reference vectors of {len(chosen)} cohort(s) to {args.out}")
    return 0


def _search(args: argparse.Namespace, settings: Settings, connection: redis.Redis) -> int:
    from pipeline.detect.search import nearest
    from pipeline.ledger import Ledger
    from pipeline.store import EmbeddingStore

    store = EmbeddingStore(connection, Ledger(connection))
    if args.sop:
        query = store.get(args.sop)
        if query is None:
            print(f"pacs-embed: no stored embedding for {args.sop}", file=sys.stderr)
            return 1
    else:
        query = _embed_file(args.file, settings, connection)
    cohort = _rule(settings).parse(args.cohort) if args.cohort else None
    try:
        hits = nearest(store, query, top=args.top, cohort=cohort, exclude=args.sop)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    if args.json:
        doc = {"query": args.sop or str(args.file), "hits": [h.to_json() for h in hits]}
        print(json.dumps(doc, indent=2))
        return 0
    for hit in hits:
        print(f"{hit.similarity:.4f}  {hit.sop_instance_uid}  {hit.cohort or '-'}")
    return 0


def _embed_file(path: Path, settings: Settings, connection: redis.Redis) -> Any:
    """The query vector of a DICOM file: its frames converted as the daemon would, embedded by
    the configured endpoint (or the emulator of a `run` on this state dir); several frames are
    averaged like a series (``nearest`` normalises the query)."""
    from pipeline.convert import ConvertOptions, convert_file
    from workers.main import build_client

    image = convert_file(path, ConvertOptions.from_settings(settings))
    with build_client(_with_local_endpoint(settings), connection) as client:
        vectors = client.embed_images(list(image.pngs))
    return np.asarray(vectors, dtype=np.float64).mean(axis=0)


def _with_local_endpoint(settings: Settings) -> Settings:
    """No endpoint configured: use the emulator a `pacs-embed run` started, as its workers do."""
    if settings.endpoint.url:
        return settings
    key_file = settings.emulator.key_file or settings.secrets_dir / "endpoint.key"
    emu = settings.emulator
    endpoint = settings.endpoint.model_copy(
        update={"url": f"http://{emu.host}:{emu.port}/score", "key_file": key_file}
    )
    return settings.model_copy(update={"endpoint": endpoint})


Route = Callable[[dict[str, str]], tuple[int, dict[str, Any]]]


def admin_routes(settings: Settings, connection: redis.Redis) -> dict[str, Route]:
    """``/search?sop=UID[&top=N][&cohort=C]`` and ``/verdicts?study=UID`` (or ``series=``)."""
    from pipeline.detect.search import nearest
    from pipeline.ledger import Ledger
    from pipeline.store import EmbeddingStore

    store = EmbeddingStore(connection, Ledger(connection))

    def search(query: dict[str, str]) -> tuple[int, dict[str, Any]]:
        sop = query.get("sop", "")
        if not is_valid_uid(sop):
            return 400, {"error": "give sop=<SOP Instance UID>"}
        vector = store.get(sop)
        if vector is None:
            return 404, {"error": "no stored embedding for that SOP Instance UID"}
        try:
            top = int(query.get("top", "10"))
            cohort = _rule(settings).parse(query["cohort"]) if query.get("cohort") else None
            hits = nearest(store, vector, top=top, cohort=cohort, exclude=sop)
        except ValueError as exc:
            return 400, {"error": str(exc)}
        return 200, {"query": sop, "hits": [h.to_json() for h in hits]}

    def verdicts(query: dict[str, str]) -> tuple[int, dict[str, Any]]:
        for kind, read in (("study", store.study_verdict), ("series", store.series_verdict)):
            uid = query.get(kind, "")
            if is_valid_uid(uid):
                found = read(uid)
                return (200, found.to_json()) if found else (404, {"error": f"no {kind}"})
        return 400, {"error": "give study=<UID> or series=<UID>"}

    return {"/search": search, "/verdicts": verdicts}
