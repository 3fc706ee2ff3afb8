"""`pacs-embed`: one console script; each subcommand builds its objects from the settings."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import structlog

from pacs_embed import verdict_commands
from pacs_embed.processes import PARENT_PID_ENV
from pipeline import logs
from pipeline.errors import ConfigError, ConversionError
from pipeline.lifetime import die_with_parent
from pipeline.settings import Settings

log = structlog.get_logger(__name__)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pacs-embed", description=__doc__)
    parser.add_argument("--config", type=Path, help="TOML settings file (env vars override it)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="everything on this machine, in the foreground")
    sub.add_parser("listen", help="the DICOM listener (spool, conversion, enqueue)")
    worker = sub.add_parser("worker", help="an embed worker")
    worker.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    sub.add_parser("admin", help="the admin HTTP endpoint")
    sub.add_parser("emulator", help="the local endpoint (NOT a medical model)")
    sub.add_parser("status", help="print the /status document")
    convert = sub.add_parser("convert", help="one DICOM file -> PNG, the daemon's code path")
    convert.add_argument("input", type=Path)
    convert.add_argument("output", type=Path, help="OUT.png, or a directory for several frames")
    convert.add_argument("--native-size", action="store_true", help="skip the final resize")
    embeddings = sub.add_parser("embeddings", help="the embeddings store")
    emb_sub = embeddings.add_subparsers(dest="action", required=True)
    export = emb_sub.add_parser("export", help="everything stored, as .npz")
    export.add_argument("--out", type=Path, required=True)
    verdict_commands.add_parsers(sub)  # reference import|export|list, search
    return parser


def main(argv: list[str] | None = None) -> int:
    parent = os.environ.get(PARENT_PID_ENV)
    if parent:
        die_with_parent(int(parent))
    args = _parser().parse_args(argv)
    try:
        settings = Settings.load(args.config)
    except ConfigError as exc:
        print(f"pacs-embed: {exc}", file=sys.stderr)
        return 2
    logs.configure(settings.log.level, settings.log.format)
    config_args = ["--config", str(args.config)] if args.config else []
    try:
        return int(_dispatch(args, settings, config_args) or 0)
    except ConfigError as exc:
        print(f"pacs-embed: {exc}", file=sys.stderr)
        return 2
    except ConversionError as exc:
        print(f"pacs-embed: cannot convert: {exc}", file=sys.stderr)
        return 1


def _dispatch(args: argparse.Namespace, settings: Settings, config_args: list[str]) -> Any:
    from pacs_embed import services

    command = args.command
    if command == "run":
        from pacs_embed.run import run

        return run(settings, config_args)
    if command == "listen":
        return _listen(settings, services.connect(settings))
    if command == "worker":
        from workers.main import run_worker

        return run_worker(settings, services.connect(settings), burst=args.burst)
    if command == "admin":
        _interrupt_on_sigterm()
        try:
            services.admin_server(settings, services.connect(settings)).serve_forever()
        except KeyboardInterrupt:
            pass
        return 0
    if command == "emulator":
        return _emulator(settings)
    if command == "status":
        from pipeline.admin.status import gather

        doc = gather(services.connect(settings), settings.spool_dir, settings.quarantine_dir)
        print(json.dumps(doc, indent=2, default=str))
        return 0
    if command == "convert":
        return _convert(args, settings)
    if command == "embeddings":
        from pipeline.ledger import Ledger
        from pipeline.store import EmbeddingStore

        connection = services.connect(settings)
        count = EmbeddingStore(connection, Ledger(connection)).export(args.out)
        print(f"exported {count} embeddings to {args.out}")
        return 0
    if command in ("reference", "search"):
        return verdict_commands.dispatch(args, settings, services.connect(settings))
    raise AssertionError(command)


def _wait_for_signal() -> None:
    received: list[int] = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda s, _f: received.append(s))
    while not received:
        signal.pause()


def _listen(settings: Settings, connection: Any) -> int:
    from dicom_listener.server import Listener

    listener = Listener(settings, connection)
    listener.start()
    try:
        _wait_for_signal()
    finally:
        listener.stop()
    return 0


def _emulator(settings: Settings) -> int:
    from emulator.server import EmulatorServer

    server = EmulatorServer(settings.emulator)
    _interrupt_on_sigterm()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
    return 0


def _interrupt_on_sigterm() -> None:
    """Let SIGTERM end a blocking serve_forever() the way Ctrl-C does."""

    def interrupt(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def _convert(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.convert import ConvertOptions, convert_file
    from pipeline.errors import SkippedError

    # The daemon's own options and code path; only the final resize can be left out.
    try:
        image = convert_file(
            args.input, ConvertOptions.from_settings(settings, native_size=args.native_size)
        )
    except SkippedError as exc:
        print(f"pacs-embed: skipped, nothing written: {exc}", file=sys.stderr)
        return 3
    if len(image.pngs) == 1 and args.output.suffix.lower() == ".png":
        args.output.write_bytes(image.pngs[0])
        print(args.output)
        return 0
    args.output.mkdir(parents=True, exist_ok=True)
    for frame, png in zip(image.frames, image.pngs, strict=True):
        path = args.output / f"{image.sop_instance_uid}_{frame:04d}.png"
        path.write_bytes(png)
        print(path)
    return 0
