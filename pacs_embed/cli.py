"""`pacs-embed`: one console script. Each subcommand is a small function of :data:`COMMANDS`;
it gets the parsed arguments and the process's composition root, which builds what it uses."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from pacs_embed import check_config, summary, verdict_commands
from pacs_embed import run as run_command
from pacs_embed.compose import Root
from pacs_embed.processes import PARENT_PID_ENV
from pacs_embed.progress import Progress
from pipeline import logs
from pipeline.convert import ConvertOptions, convert_file
from pipeline.errors import ConfigError, ConversionError, SkippedError
from pipeline.lifetime import die_with_parent
from pipeline.settings import Settings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pacs-embed", description=__doc__)
    parser.add_argument("--config", type=Path, help="TOML settings file (env vars override it)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="everything on this machine, in the foreground")
    sub.add_parser("listen", help="a DICOM listener process (C-STORE to the spool)")
    sub.add_parser("dispatch", help="a listener node's dispatcher (conversion, enqueue)")
    worker = sub.add_parser("worker", help="an embed worker")
    worker.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    sub.add_parser("admin", help="the admin HTTP endpoint")
    sub.add_parser("push", help="study completion, result pushes and spool retention")
    sub.add_parser("emulator", help="the local endpoint (NOT a medical model)")
    status_cmd = sub.add_parser("status", help="a summary of the /status document")
    status_cmd.add_argument("--json", action="store_true", help="the whole document, as JSON")
    check = sub.add_parser(
        "check-config", help="validate the settings and print them, secrets masked"
    )
    check.add_argument("file", type=Path, nargs="?", help="TOML settings file (else --config)")
    check.add_argument("--json", action="store_true", help="print JSON instead of TOML")
    convert = sub.add_parser("convert", help="one DICOM file -> PNG, the daemon's code path")
    convert.add_argument("input", type=Path)
    convert.add_argument("output", type=Path, help="OUT.png, or a directory for several frames")
    convert.add_argument("--native-size", action="store_true", help="skip the final resize")
    embeddings = sub.add_parser("embeddings", help="the embeddings store")
    emb_sub = embeddings.add_subparsers(dest="action", required=True)
    export = emb_sub.add_parser("export", help="everything stored, as .npz")
    export.add_argument("--out", type=Path, required=True)
    requeue = sub.add_parser(
        "requeue", help="do again: push dead letters or a study's results, embed failed instances"
    )
    requeue.add_argument("dead_letters", nargs="*", metavar="ID", help="dead letter ids")
    requeue.add_argument("--study", action="append", default=[], metavar="UID")
    requeue.add_argument(
        "--instance", action="append", default=[], metavar="UID", help="a failed instance"
    )
    purge = sub.add_parser("purge", help="delete quarantined instances")
    purge.add_argument("--older-than-days", type=float, default=0.0, metavar="N")
    verdict_commands.add_parsers(sub)  # reference import|export|list, search
    return parser


def main(argv: list[str] | None = None) -> int:
    parent = os.environ.get(PARENT_PID_ENV)
    if parent:
        die_with_parent(int(parent))
    args = _parser().parse_args(argv)
    if args.command == "check-config":  # reports invalid settings itself; builds nothing
        return check_config.run(args.file or args.config, as_json=args.json)
    try:
        settings = Settings.load(args.config)
    except ConfigError as exc:
        print(f"pacs-embed: {exc}", file=sys.stderr)
        return 2
    logs.configure(settings.log.level, settings.log.format)
    try:
        with Root(settings) as root:
            return COMMANDS[args.command](args, root)
    except ConfigError as exc:
        print(f"pacs-embed: {exc}", file=sys.stderr)
        return 2
    except ConversionError as exc:
        print(f"pacs-embed: cannot convert: {exc}", file=sys.stderr)
        return 1


# -- the commands ------------------------------------------------------------------------------


def run(args: argparse.Namespace, root: Root) -> int:
    return run_command.run(root.settings, args.config)


def listen(_args: argparse.Namespace, root: Root) -> int:
    return _serve_until_signal(root.listener)


def dispatch(_args: argparse.Namespace, root: Root) -> int:
    return _serve_until_signal(root.dispatch_host)


def worker(args: argparse.Namespace, root: Root) -> int:
    root.work(burst=args.burst)
    return 0


def admin(_args: argparse.Namespace, root: Root) -> int:
    """Serve in the foreground; SIGTERM or SIGINT stops it gracefully, with exit status 0 (`run`
    starts this command as its child and stops it with SIGTERM)."""
    root.admin.serve_forever()
    return 0


def push(_args: argparse.Namespace, root: Root) -> int:
    root.push()
    return 0


def requeue(args: argparse.Namespace, root: Root) -> int:
    from pipeline.requeue import (
        NothingToRequeue,
        requeue_dead_letter,
        requeue_instance,
        requeue_study,
    )

    if not (args.dead_letters or args.study or args.instance):
        print(
            "pacs-embed requeue: name dead letter ids, --study UID or --instance UID",
            file=sys.stderr,
        )
        return 2
    missing = 0
    named = [
        *(("dead_letter", name) for name in args.dead_letters),
        *(("study", name) for name in args.study),
        *(("instance", name) for name in args.instance),
    ]
    for kind, name in named:
        try:
            if kind == "study":
                job_ids = requeue_study(root.redis, root.studies, root.sinks, name)
            elif kind == "instance":
                requeue_instance(root.redis, root.ledger, name)
                job_ids = ["handed to the listener"]
            else:
                job_ids = [requeue_dead_letter(root.redis, name)]
        except NothingToRequeue as exc:
            print(f"pacs-embed requeue: {exc}", file=sys.stderr)
            missing += 1
            continue
        for job_id in job_ids:
            print(f"requeued {name}: {job_id}")
    return 1 if missing else 0


def purge(args: argparse.Namespace, root: Root) -> int:
    purged = root.spool.purge_quarantine(args.older_than_days * 86400)
    print(f"purged {purged} quarantined instances")
    return 0


def emulator(_args: argparse.Namespace, root: Root) -> int:
    server = root.emulator
    _interrupt_on_sigterm()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
    return 0


def status(args: argparse.Namespace, root: Root) -> int:
    """A readable summary of the /status document; ``--json``: the document itself."""
    doc = root.status()
    if args.json:
        print(json.dumps(doc, indent=2, default=str))
    else:
        print(summary.render(doc), end="")
    return 0


def convert(args: argparse.Namespace, root: Root) -> int:
    # The daemon's own options and code path; only the final resize can be left out.
    options = ConvertOptions.from_settings(root.settings, native_size=args.native_size)
    try:
        image = convert_file(args.input, options)
    except SkippedError as exc:
        print(f"pacs-embed: skipped, nothing written: {exc}", file=sys.stderr)
        return 3
    if len(image.pngs) == 1 and args.output.suffix.lower() == ".png":
        args.output.write_bytes(image.pngs[0])
        print(args.output)
        return 0
    args.output.mkdir(parents=True, exist_ok=True)
    for frame, png in zip(image.frames, image.pngs, strict=True):
        path = args.output / f"{image.images[0].sop_instance_uid}_{frame:04d}.png"
        path.write_bytes(png)
        print(path)
    return 0


def embeddings(args: argparse.Namespace, root: Root) -> int:
    with Progress(f"exporting to {args.out}") as progress:  # on a terminal only
        count = root.store.export(
            args.out, lambda phase, done, total: progress.update(done, total, f"export: {phase}")
        )  # the only action: export
    print(f"exported {count} embeddings to {args.out}")
    return 0


Command = Callable[[argparse.Namespace, Root], int]

#: Subcommand -> what runs it.
COMMANDS: dict[str, Command] = {
    "run": run,
    "listen": listen,
    "dispatch": dispatch,
    "worker": worker,
    "admin": admin,
    "push": push,
    "requeue": requeue,
    "purge": purge,
    "emulator": emulator,
    "status": status,
    "convert": convert,
    "embeddings": embeddings,
    "reference": verdict_commands.reference,
    "search": verdict_commands.search,
}


class _Service(Protocol):
    def start(self) -> None: ...
    def stop(self) -> None: ...


def _serve_until_signal(service: _Service) -> int:
    """Run a service whose threads do the work until SIGTERM or SIGINT, then stop it."""
    service.start()
    try:
        _wait_for_signal()
    finally:
        service.stop()
    return 0


def _wait_for_signal() -> None:
    received: list[int] = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda s, _f: received.append(s))
    while not received:
        signal.pause()


def _interrupt_on_sigterm() -> None:
    """Let SIGTERM end a blocking serve_forever() the way Ctrl-C does."""

    def interrupt(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
