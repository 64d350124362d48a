"""`mage serve`: serve a store over HTTP, every ServerSettings field a flag."""

from __future__ import annotations

import argparse
import sys
import typing

from model_store.errors import StoreError
from server.settings import ServerSettings

# What start-up writes: a package-shipped GGUF base is converted into MAGE_CACHE_DIR (under
# $HOME by default); Hugging Face libraries keep their caches in HF_HOME (also under $HOME).
FOLDERS_HINT = (
    "the store must be readable by this user, and MAGE_CACHE_DIR, HF_HOME and HOME writable; "
    "with a read-only root filesystem mount a writable emptyDir or tmpfs owned by this user "
    "at $HOME"
)


def os_error_line(exc: OSError) -> str:
    """One line for a file system error at start-up: what failed, on which path, what to do."""
    where = f": {exc.filename}" if exc.filename else ""
    return f"mage serve: cannot start: {exc.strerror or exc}{where} ({FOLDERS_HINT})"


def quiet_progress_bars() -> None:
    """No terminal (docker logs, kubectl logs, a file): progress bars would only be lines of
    carriage returns, so Hugging Face's are turned off. tqdm's own default is read from
    TQDM_DISABLE when it is imported, which the image sets."""
    if sys.stderr.isatty():
        return
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _serve(args: argparse.Namespace) -> int:
    from model_store.validate import check_store
    from server.app import create_app
    from server.http_protocol import serve

    overrides = {
        k: v for k, v in vars(args).items() if k in ServerSettings.model_fields and v is not None
    }
    settings = ServerSettings(**overrides)
    if not settings.store:
        from model_store.resources import demo_store_path

        try:
            demo = demo_store_path()
        except FileNotFoundError as exc:
            print(f"mage serve: no --store given and no demo store: {exc}", file=sys.stderr)
            return 2
        print(f"mage serve: no --store given; serving the embedded demo store {demo}")
        settings = settings.model_copy(update={"store": str(demo)})
    quiet_progress_bars()
    try:
        check_store(settings.store)  # fail fast, with the file and the problem, before binding
    except StoreError as exc:
        print(f"mage serve: bad store: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # an unwritable cache or home folder, an unreadable store file
        print(os_error_line(exc), file=sys.stderr)
        return 2
    serve(create_app(settings), settings)
    return 0


def add_serve_command(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser("serve", help="serve a store over HTTP")
    for name, field in ServerSettings.model_fields.items():
        flag, help_text = (
            f"--{name.replace('_', '-')}",
            f"{field.description} [env MAGE_{name.upper()}]",
        )
        if field.annotation is bool:
            serve.add_argument(
                flag, dest=name, action=argparse.BooleanOptionalAction, help=help_text
            )
        elif typing.get_origin(field.annotation) is list:  # repeatable (api keys, origins)
            serve.add_argument(flag, dest=name, action="append", default=None, help=help_text)
        else:
            kind = field.annotation if field.annotation in (int, float) else str
            serve.add_argument(flag, dest=name, type=kind, default=None, help=help_text)
    serve.set_defaults(func=_serve)
