"""`pacs-embed reference import|export|list` and `pacs-embed search`.

The commands of cli.py's table that read verdict state; each gets the process's root and calls
pipeline/detect. The admin routes answering the same questions over HTTP are in
``pipeline.admin.routes``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import numpy.typing as npt

from pacs_embed.compose import Root, with_local_endpoint
from pacs_embed.progress import Progress
from pipeline.convert import ConvertOptions, convert_file
from pipeline.detect import transfer
from pipeline.detect.search import nearest
from pipeline.errors import ConfigError


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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


def reference(args: argparse.Namespace, root: Root) -> int:
    store = root.references
    if args.action == "import":
        try:
            groups = transfer.read_reference_file(args.file, root.cohort_rule, args.cohort)
            imported = []
            with Progress("importing cohorts", len(groups)) as progress:  # on a terminal only
                for n, (cohort, group) in enumerate(groups.items(), 1):
                    imported += transfer.import_references(store, {cohort: group})
                    progress.update(n)
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
    chosen = [root.cohort_rule.parse(c) for c in args.cohort] if args.cohort else cohorts
    snapshots = []
    with Progress("reading cohorts", len(chosen)) as progress:  # on a terminal only
        for cohort in chosen:
            snapshots.append(store.snapshot(cohort))
            progress.advance()
        progress.update(len(chosen), label=f"writing {args.out}")
        count = transfer.write_reference_file(args.out, snapshots)
    print(f"exported {count} reference vectors of {len(chosen)} cohort(s) to {args.out}")
    return 0


def search(args: argparse.Namespace, root: Root) -> int:
    if args.sop:
        query = root.store.get(args.sop)
        if query is None:
            print(f"pacs-embed: no stored embedding for {args.sop}", file=sys.stderr)
            return 1
    else:
        query = _embed_file(args.file, root)
    cohort = root.cohort_rule.parse(args.cohort) if args.cohort else None
    try:
        hits = nearest(root.store, query, top=args.top, cohort=cohort, exclude=args.sop)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    if args.json:
        doc = {"query": args.sop or str(args.file), "hits": [h.to_json() for h in hits]}
        print(json.dumps(doc, indent=2))
        return 0
    for hit in hits:
        print(f"{hit.similarity:.4f}  {hit.image.key}  {hit.cohort or '-'}")
    return 0


def _embed_file(path: Path, root: Root) -> npt.NDArray[np.float64]:
    """The query vector of a DICOM file: its frames converted as the daemon would, embedded by
    the configured endpoint (or the emulator of a `run` on this state dir); several frames are
    averaged like a series (``nearest`` normalises the query)."""
    image = convert_file(path, ConvertOptions.from_settings(root.settings))
    with Root(with_local_endpoint(root.settings), root.redis) as embedding:
        vectors = embedding.client.embed_images(list(image.pngs))
    mean: npt.NDArray[np.float64] = np.asarray(vectors, dtype=np.float64).mean(axis=0)
    return mean
