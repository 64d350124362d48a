"""`mage train ...`: backbone (Eq. 11-12) and explicit value model (Eq. 16, or an autoregressive
reward model) training commands.

Wire into a parser with ``add_train_commands(subparsers)``; every command sets ``func`` to a
handler ``(args) -> int`` that returns an exit code and prints problems (naming the file or
setting) without a traceback. Re-running a command on the same output folder resumes it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from training.common import TrainingError, check_base, parse_floats, parse_names, strict_json

SPLIT_HELP = 'a prompt split (train, validation, test) or a JSONL file of {"prompt": ...} lines'
_EXPECTED = (TrainingError, ValueError, OSError)  # StoreError and RewardError are subclasses


def _fail(command: str, exc: BaseException) -> int:
    print(f"mage train {command}: {exc}", file=sys.stderr)
    return 2


def _run(command: str, func, args: argparse.Namespace) -> int:
    from model_store.errors import StoreError
    from objectives.rewards import RewardError

    try:
        return func(args)
    except (*_EXPECTED, StoreError, RewardError) as exc:
        return _fail(command, exc)
    except KeyboardInterrupt:
        print(f"mage train {command}: interrupted; run it again to resume", file=sys.stderr)
        return 130


def _targets(args: argparse.Namespace) -> tuple[str, ...]:
    """--targets resolved against --base (auto, all-linear or names)."""
    from model_store.architectures import resolve_lora_targets

    try:
        return resolve_lora_targets(args.targets, check_base(args.base))
    except ValueError as exc:
        raise TrainingError(f"--targets: {exc}") from None


def _rl_settings(args: argparse.Namespace) -> dict:
    settings = {
        "steps": args.steps,
        "kl": args.kl,
        "lr": args.lr,
        "rank": args.rank,
        "lora_alpha": args.lora_alpha,
        "targets": _targets(args),
        "prompts_per_step": args.prompts_per_step,
        "num_generations": args.num_generations,
        "max_completion_length": args.max_completion_length,
        "split": args.split,
        "max_prompts": args.max_prompts,
        "save_steps": args.save_steps,
        "seed": args.seed,
        "device": args.device,
        "progress": not args.no_progress,
    }
    if args.steps < 1 or args.num_generations < 2 or args.prompts_per_step < 1:
        raise TrainingError("--steps and --prompts-per-step must be >= 1, --num-generations >= 2")
    return settings


def _backbone(args: argparse.Namespace) -> int:
    from training.backbone import BackboneTrainConfig, train_backbone

    rewards = parse_names(args.rewards)
    if args.weights:
        weights = parse_floats(args.weights, "--weights")
    elif len(rewards) == 1:
        weights = [1.0]
    else:
        raise TrainingError("--weights: give one weight per reward (w_i of Eq. 11)")
    scale = None
    if args.reward_scale:
        from objectives.scale import scale_from_store

        scale = scale_from_store(args.reward_scale, rewards)
    config = BackboneTrainConfig(
        base=args.base,
        rewards=rewards,
        weights=weights,
        out=args.out,
        reward_scale=scale,
        **_rl_settings(args),
    )
    result = train_backbone(config)
    means = ", ".join(f"{k}={v:.4f}" for k, v in result.reward_means.items())
    resumed = f" (resumed from {result.resumed_from})" if result.resumed_from else ""
    print(f"trained backbone: {result.global_step} steps{resumed}; reward means: {means}")
    print(f"adapter: {result.adapter_dir}")
    return 0


def _backbones(args: argparse.Namespace) -> int:
    from model_store.validate import check_store
    from training.backbone import train_backbone_store

    rewards = parse_names(args.rewards)
    store = train_backbone_store(
        args.base,
        rewards,
        args.beta,
        args.store,
        work=args.work,
        copy_base=args.copy_base,
        scale_samples=args.scale_samples,
        **_rl_settings(args),
    )
    checked = check_store(store)
    print(f"wrote store {checked.root}: {len(rewards)} backbones, beta={args.beta}")
    return 0


def _value_config(args: argparse.Namespace):
    """The ValueTrainConfig of `mage train value` (and `value-curve`) options."""
    from training.sampling import SamplingSettings
    from training.value import ValueTrainConfig

    if args.epochs < 1 or args.batch_size < 1 or args.samples_per_prompt < 1:
        raise TrainingError("--epochs, --batch-size and --samples-per-prompt must be >= 1")
    scale = None
    if args.reward_scale:
        from objectives.scale import scale_from_store

        scale = scale_from_store(args.reward_scale, [args.objective])
    config = ValueTrainConfig(
        base=args.base,
        objective=args.objective,
        reward_scale=scale,
        out=args.out,
        train_split=args.split,
        val_split=args.val_split,
        max_train_prompts=args.max_prompts,
        max_val_prompts=args.max_val_prompts,
        sampling=SamplingSettings(
            samples_per_prompt=args.samples_per_prompt,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
        ),
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        rank=args.rank,
        lora_alpha=args.lora_alpha,
        targets=_targets(args),
        seed=args.seed,
        device=args.device,
        progress=not args.no_progress,
    )
    return config


def _arm_value(args: argparse.Namespace) -> int:
    from training.value_arm import ArmTrainConfig, train_arm_value

    if args.pairs_per_prompt is not None and args.pairs_per_prompt < 1:
        raise TrainingError("--pairs-per-prompt must be >= 1")
    config = ArmTrainConfig(_value_config(args), args.beta, args.pairs_per_prompt)
    result = train_arm_value(config)
    m = result.metrics
    print(
        f"autoregressive reward model for {args.objective!r} (beta {m['beta']}): pairwise loss "
        f"{m['initial_train_pair_loss']:.4f} -> {m['final_train_pair_loss']:.4f} on "
        f"{m['train_pairs']} pairs"
    )
    if m["validation"]:
        print("validation: " + strict_json(m["validation"]))
    print(f"adapter: {result.adapter_dir} (store: kind 'arm', beta {m['beta']}, no head)")
    return 0


def _value(args: argparse.Namespace) -> int:
    from training.value import train_value_model

    if args.kind == "arm":
        return _arm_value(args)
    result = train_value_model(_value_config(args))
    m = result.metrics
    print(
        f"value model for {args.objective!r}: train MSE {m['initial_train_mse']:.4f} -> "
        f"{m['final_train_mse']:.4f}"
    )
    if m["validation"]:
        print("validation: " + strict_json(m["validation"]))
    print(f"adapter: {result.adapter_dir}\nhead: {result.head_path}")
    return 0


def _value_compare(args: argparse.Namespace) -> int:
    from training.value_compare import compare_ranking

    for row in compare_ranking(args.base, args.samples, args.run, args.batch_size, args.device):
        print(strict_json(row))
    return 0


def _value_curve(args: argparse.Namespace) -> int:
    from training.value_curve import learning_curve

    sizes = [int(v) for v in parse_floats(args.sizes, "--sizes")]
    for row in learning_curve(_value_config(args), args.samples, sizes):
        print(strict_json(row))
    print(f"curve: {args.out / 'curve.json'}")
    return 0


def _baseline_options(parser: argparse.ArgumentParser) -> None:
    """--store, --preferences, --work, --rewards of the trained baselines."""
    parser.add_argument("--store", type=Path, required=True, help="store to train it for")
    parser.add_argument("--work", type=Path, default=None, help="checkpoints (default STORE-work)")
    parser.add_argument("--rewards", default="", help="reward specs (default: the objectives)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda")


def _store_objectives(args: argparse.Namespace) -> int:
    from model_store.validate import read_manifest

    return len(read_manifest(args.store).objectives)


def _morlhf(args: argparse.Namespace) -> int:
    from training.baselines import parse_preferences
    from training.morlhf import MorlhfConfig, train

    settings = _rl_settings(args)
    config = MorlhfConfig(
        store=args.store,
        preferences=parse_preferences(args.preferences, _store_objectives(args)),
        work=args.work,
        rewards=tuple(parse_names(args.rewards)) or None,
        backbone=settings,
        from_specialists=args.from_specialists,
    )
    for mu, path in train(config):
        print(f"morlhf {list(mu)}: {path}")
    return 0


def _fine_tune_run(args: argparse.Namespace):
    """The FineTuneRun (MODPO, RiC) of the command's options."""
    from training.baselines import FineTuneRun
    from training.runs import LoraSettings
    from training.sampling import SamplingSettings

    return FineTuneRun(
        store=args.store,
        work=args.work,
        rewards=tuple(parse_names(args.rewards)) or None,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        lora=LoraSettings(args.rank, args.lora_alpha, _targets_of(args.targets, args.store)),
        sampling=SamplingSettings(args.samples_per_prompt, args.max_new_tokens),
        split=args.split,
        max_prompts=args.max_prompts,
        save_steps=args.save_steps,
        seed=args.seed,
        device=args.device,
        progress=not args.no_progress,
    )


def _targets_of(targets: str, store: Path) -> tuple[str, ...]:
    from training.baselines import store_task

    return _targets(argparse.Namespace(targets=targets, base=store_task(store).base))


def _modpo(args: argparse.Namespace) -> int:
    from training.baselines import parse_preferences
    from training.modpo import ModpoConfig, train

    config = ModpoConfig(
        run=_fine_tune_run(args),
        preferences=parse_preferences(args.preferences, _store_objectives(args)),
        beta=args.beta,
    )
    for w, path in train(config):
        print(f"modpo {list(w)}: {path}")
    return 0


def _ric(args: argparse.Namespace) -> int:
    from training.ric import RicConfig, train

    config = RicConfig(
        run=_fine_tune_run(args), online_rounds=args.online_rounds, quantile=args.quantile
    )
    print(f"ric: {train(config)}")
    return 0


def _sft_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=100, help="steps per adapter or round")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank")
    parser.add_argument("--lora-alpha", type=int, default=16)
    parser.add_argument("--targets", default="auto", help="LoRA targets (as for backbones)")
    parser.add_argument("--batch-size", type=int, default=4, help="pairs/responses per step")
    parser.add_argument("--samples-per-prompt", type=int, default=4, help="1 greedy + N-1 sampled")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--split", default="train", help=SPLIT_HELP)
    parser.add_argument("--max-prompts", type=int, default=None)
    parser.add_argument("--save-steps", type=int, default=25, help="checkpoint every N steps")


PREFERENCES_HELP = "preferences 'w1,w2;w1,w2;...' (default: mage eval's sweep, both ends)"


def _add_baseline_commands(sub: argparse._SubParsersAction) -> None:
    morlhf = sub.add_parser("morlhf", help="MORLHF: one GRPO adapter per preference on mu^T r~")
    _baseline_options(morlhf)
    morlhf.add_argument("--lr", type=float, default=1e-4)
    morlhf.add_argument("--rank", type=int, default=8, help="LoRA rank")
    morlhf.add_argument("--lora-alpha", type=int, default=16)
    morlhf.add_argument("--targets", default="auto", help="LoRA targets (as for backbones)")
    morlhf.add_argument("--preferences", default="", help=PREFERENCES_HELP)
    morlhf.add_argument(
        "--from-specialists",
        action="store_true",
        help="at mu = e_i take the store's specialist (the same training) instead of training "
        "again; only where the specialists used these settings",
    )
    _rl_options(morlhf, rewards=False)
    morlhf.set_defaults(func=lambda a: _run("morlhf", _morlhf_with_base, a))

    modpo = sub.add_parser("modpo", help="MODPO: one DPO-with-margin adapter per weight w")
    _baseline_options(modpo)
    _sft_options(modpo)
    modpo.add_argument("--preferences", default="", help=PREFERENCES_HELP)
    modpo.add_argument("--beta", type=float, default=0.1, help="MODPO's KL strength beta")
    modpo.set_defaults(func=lambda a: _run("modpo", _modpo, a))

    ric = sub.add_parser("ric", help="Rewards-in-Context: SFT on reward-tagged prompts + online")
    _baseline_options(ric)
    _sft_options(ric)
    ric.add_argument("--online-rounds", type=int, default=1, help="online rounds (>= 1)")
    ric.add_argument("--quantile", type=float, default=0.7, help="rejection quantile (RiC: 0.7)")
    ric.set_defaults(func=lambda a: _run("ric", _ric, a))


def _morlhf_with_base(args: argparse.Namespace) -> int:
    from training.baselines import store_task

    args.base = store_task(args.store).base  # --targets resolve against the store's base
    return _morlhf(args)


def _common(parser: argparse.ArgumentParser, lr: float) -> None:
    parser.add_argument("--base", type=Path, required=True, help="HF model folder (the SFT base)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=lr, help=f"learning rate (default {lr})")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank")
    parser.add_argument("--lora-alpha", type=int, default=16)
    parser.add_argument(
        "--targets",
        default="auto",
        help="LoRA target modules: comma-separated names, 'auto' (the base's defaults: PEFT's "
        "mapping for its model type, e.g. q_proj,v_proj; c_attn on GPT-2) or 'all-linear'",
    )
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _rl_options(parser: argparse.ArgumentParser, rewards: bool = True) -> None:
    if rewards:
        parser.add_argument("--rewards", required=True, help="comma-separated reward specs r_j")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps")
    parser.add_argument("--kl", type=float, default=0.05, help="KL coefficient eta of Eq. (11)")
    parser.add_argument("--prompts-per-step", type=int, default=2)
    parser.add_argument("--num-generations", type=int, default=4, help="GRPO group size")
    parser.add_argument("--max-completion-length", type=int, default=32)
    parser.add_argument("--split", default="train", help=SPLIT_HELP)
    parser.add_argument("--max-prompts", type=int, default=None)
    parser.add_argument("--save-steps", type=int, default=25, help="checkpoint every N steps")


def add_train_commands(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``train {backbone,backbones,value}`` on a `mage` subparsers object."""
    train = subparsers.add_parser("train", help="train backbones and value models (Stage 1/2)")
    sub = train.add_subparsers(dest="train_command", required=True)

    one = sub.add_parser("backbone", help="one backbone on h = sum_j w_j r_j with KL (Eq. 11)")
    _common(one, 1e-4)
    _rl_options(one)
    one.add_argument("--weights", help="comma-separated w_j, one per reward, summing to 1")
    one.add_argument("--out", type=Path, required=True, help="output folder (resumable)")
    one.add_argument(
        "--reward-scale",
        type=Path,
        default=None,
        help="store (or manifest) whose reward_scale rescales the rewards (default: raw)",
    )
    one.set_defaults(func=lambda a: _run("backbone", _backbone, a))

    many = sub.add_parser("backbones", help="all n backbones of the circulant B into a store")
    _common(many, 1e-4)
    _rl_options(many)
    many.add_argument("--beta", type=float, default=0.7, help="dominant weight of B (Eq. 12)")
    many.add_argument("--store", type=Path, required=True, help="store folder to write")
    many.add_argument("--work", type=Path, default=None, help="checkpoints (default STORE-work)")
    many.add_argument("--copy-base", action="store_true", help="copy the base into STORE/base")
    many.add_argument(
        "--scale-samples",
        type=int,
        default=4,
        help="base responses per train prompt to fit the store's reward_scale on, when it has "
        "none (0: train on raw rewards)",
    )
    many.set_defaults(func=lambda a: _run("backbones", _backbones, a))
    _add_baseline_commands(sub)

    value = sub.add_parser("value", help="explicit value model for one objective (Eq. 16)")
    _value_options(value)
    value.add_argument(
        "--kind",
        choices=("tied", "arm"),
        default="tied",
        help="tied: LoRA + tied value head regressed on the reward (Eq. 16); arm: an "
        "autoregressive reward model (GenARM), r = beta sum_t log pi_r, trained on ranked pairs",
    )
    value.add_argument(
        "--beta", type=float, default=0.1, help="arm only: beta of r = beta sum_t log pi_r"
    )
    value.add_argument(
        "--pairs-per-prompt",
        type=int,
        default=None,
        help="arm only: train on this many pairs a prompt, those of the widest reward gap "
        "(default: every ranked pair)",
    )
    value.set_defaults(func=lambda a: _run("value", _value, a))
    compare = sub.add_parser(
        "value-compare", help="ranking accuracy of value-model runs of any kind on the same pairs"
    )
    compare.add_argument("--base", type=Path, required=True, help="the runs' base model folder")
    compare.add_argument(
        "--samples", type=Path, required=True, help="scored samples, e.g. a run's samples-val.jsonl"
    )
    compare.add_argument(
        "--run", type=Path, action="append", required=True, help="a value run folder (repeat)"
    )
    compare.add_argument("--batch-size", type=int, default=4)
    compare.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda")
    compare.set_defaults(func=lambda a: _run("value-compare", _value_compare, a))
    curve = sub.add_parser(
        "value-curve", help="validation ranking accuracy against the number of training samples"
    )
    _value_options(curve)
    curve.add_argument(
        "--samples",
        type=Path,
        required=True,
        help="folder with the samples-train/val.jsonl of a finished value run (reused)",
    )
    curve.add_argument("--sizes", required=True, help="training prompts per point, e.g. 27,54,109")
    curve.set_defaults(func=lambda a: _run("value-curve", _value_curve, a))
    return train


def _value_options(value: argparse.ArgumentParser) -> None:
    _common(value, 1e-4)
    value.add_argument("--objective", required=True, help="reward spec whose return V predicts")
    value.add_argument("--out", type=Path, required=True, help="output folder (resumable)")
    value.add_argument("--epochs", type=int, default=3)
    value.add_argument("--batch-size", type=int, default=4)
    value.add_argument("--samples-per-prompt", type=int, default=4, help="1 greedy + N-1 sampled")
    value.add_argument("--max-new-tokens", type=int, default=32)
    value.add_argument("--temperature", type=float, default=1.0)
    value.add_argument("--split", default="train", help=SPLIT_HELP)
    value.add_argument(
        "--val-split", default="validation", help="validation prompts: " + SPLIT_HELP
    )
    value.add_argument("--max-prompts", type=int, default=None, help="train prompts to use")
    value.add_argument("--max-val-prompts", type=int, default=None)
    value.add_argument(
        "--reward-scale",
        type=Path,
        default=None,
        help="store (or manifest) whose reward_scale V regresses on (default: raw reward)",
    )
