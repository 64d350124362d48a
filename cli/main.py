"""`mage` — serve a store, check, inspect or prepare stores, train, evaluate and tune.

Each subcommand lives in a module of its own (cli/serve.py, cli/store.py, cli/eval.py,
cli/seeds.py, cli/tune.py, training/cli.py) that adds its parser and handler; this module
builds the parser and dispatches, after checking the subcommand's extras are installed."""

from __future__ import annotations

import argparse
import sys

from cli import extras
from cli.eval import add_eval_command
from cli.seeds import add_seeds_command
from cli.serve import add_serve_command
from cli.store import add_store_commands
from cli.tune import add_tune_commands
from training.cli import add_train_commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mage", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    add_serve_command(sub)
    add_store_commands(sub)
    add_eval_command(sub)
    add_seeds_command(sub)
    add_tune_commands(sub)
    add_train_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = extras.command_of(args)
    missing = extras.missing_modules(extras.extras_for(command))
    if missing:
        print(extras.missing_message(command, missing), file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except ModuleNotFoundError as exc:  # a package of an extra, imported on a path not foreseen
        module = extras.extra_module(exc)
        if module is None:
            raise
        print(extras.missing_message(command, [module]), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
