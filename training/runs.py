"""What every TRL run here shares: the LoRA config, the Trainer arguments that keep a CPU run
plain and resumable, resuming from ``out/checkpoints``, strict-JSON logs and the final adapter.

The backbones (GRPO), MORLHF (the same GRPO per preference), MODPO (DPO) and RiC (SFT) all
train one LoRA adapter over the base through a TRL trainer with these pieces, so a stopped
run of any of them continues from its folder the same way.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from objectives.rewards import RewardError
from training.common import TrainingError, strict_json
from training.costs import CostClock

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass(frozen=True)
class LoraSettings:
    """The LoRA every method trains (the same rank and targets, so costs compare)."""

    rank: int = 8
    """LoRA rank r."""
    lora_alpha: int = 16
    """LoRA alpha (scale alpha / r)."""
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    """Target module names."""


def lora_config(rank: int, lora_alpha: int, targets: tuple[str, ...]):
    """PEFT's LoraConfig for a causal LM: no dropout, no bias, nothing else saved."""
    from peft import LoraConfig

    return LoraConfig(
        r=rank,
        lora_alpha=lora_alpha,
        target_modules=list(targets),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )


def trainer_args(
    ckpt_dir: Path, steps: int, lr: float, seed: int, cpu: bool, progress: bool, save_steps: int
) -> dict:
    """transformers TrainingArguments fields every run shares: a constant learning rate (so a
    resumed run with more steps continues evenly), checkpoints every `save_steps`, a log per
    step, no hub, no reporting, fp32."""
    return dict(
        output_dir=str(ckpt_dir),
        max_steps=steps,
        learning_rate=lr,
        lr_scheduler_type="constant",
        save_strategy="steps",
        save_steps=save_steps,
        save_total_limit=2,
        logging_steps=1,
        report_to="none",
        push_to_hub=False,
        seed=seed,
        data_seed=seed,
        use_cpu=cpu,
        bf16=False,
        gradient_checkpointing=False,
        disable_tqdm=not progress,
    )


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest ``checkpoint-N`` under `folder`, or None."""
    if not folder.is_dir():
        return None
    from transformers.trainer_utils import get_last_checkpoint

    found = get_last_checkpoint(str(folder))
    return Path(found) if found else None


def checkpoint_step(checkpoint: Path | None) -> int | None:
    """The global step a checkpoint reached; None when absent or incomplete."""
    if checkpoint is None:
        return None
    try:
        return int(json.loads((checkpoint / "trainer_state.json").read_text())["global_step"])
    except (OSError, ValueError, KeyError):  # an incomplete checkpoint: the Trainer decides
        return None


def empty_dir(path: Path) -> Path:
    """`path`, removed first when it exists (the final adapter is written fresh)."""
    if path.exists():
        shutil.rmtree(path)
    return path


def copy_adapter(source: Path, target: Path) -> Path:
    """The PEFT adapter files of `source` (an adapter folder or a checkpoint) into `target`."""
    empty_dir(target).mkdir(parents=True)
    for name in ADAPTER_FILES:
        shutil.copy(source / name, target / name)
    return target


def print_logs_as_json(trainer, progress: bool) -> None:
    """Replace the Trainer's log printers, which print Python dict reprs (single quotes,
    bare nan), with one strict JSON line per log, so printed metrics parse."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    class JsonProgress(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and self.training_bar is not None and logs:
                self.training_bar.write(strict_json(logs))

    class JsonPrinter(PrinterCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_local_process_zero and logs:
                print(strict_json(logs), flush=True)

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(JsonProgress() if progress else JsonPrinter())


class RunLog:
    """Counts the optimizer steps of this call and appends each training log that has
    `key` to ``out/log.jsonl`` (and to `history`)."""

    def __init__(self, out: Path, key: str = "loss") -> None:
        self.out, self.key = out, key
        self.history: list[dict] = []
        self.steps_run = 0

    def callback(self):
        from transformers import TrainerCallback

        log = self

        class _Recorder(TrainerCallback):
            def on_step_end(self, _args, state, control, **kwargs):
                log.steps_run += 1

            def on_log(self, _args, state, control, logs=None, **kwargs):
                if logs and log.key in logs:
                    entry = {"step": state.global_step, **logs}
                    log.history.append(entry)
                    with (log.out / "log.jsonl").open("a", encoding="utf-8") as handle:
                        handle.write(strict_json(entry) + "\n")

        return _Recorder()


def train_to_adapter(
    make_trainer: Callable[[RunLog], object],
    out: Path,
    steps: int,
    adapter_dir: Path,
    progress: bool,
    log_key: str = "loss",
) -> tuple[int, int, Path | None, RunLog]:
    """Run a TRL trainer to `steps` optimizer steps, resuming from ``out/checkpoints``, and
    write its adapter to `adapter_dir`. A run whose checkpoint already reached `steps` is not
    resumed (transformers' Trainer, resumed at max_steps, still runs one more step): its adapter
    is copied from that checkpoint. Returns (global step, steps run now, resumed from, log)."""
    resume = latest_checkpoint(out / "checkpoints")
    done = checkpoint_step(resume)
    log = RunLog(out, log_key)
    if resume is not None and done is not None and done >= steps:
        copy_adapter(resume, adapter_dir)
        return done, 0, resume, log
    out.mkdir(parents=True, exist_ok=True)
    # before the trainer: building it is cost too (MODPO precomputes its reference there)
    clock = CostClock(out, done or 0)
    trainer = make_trainer(log)
    print_logs_as_json(trainer, progress)
    trainer.add_callback(clock.callback())  # type: ignore[attr-defined]
    try:
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)  # type: ignore[attr-defined]
    except RewardError as exc:  # a reward that fails mid-run names itself, without a traceback
        raise TrainingError(str(exc)) from None
    clock.record(trainer.state.global_step)  # type: ignore[attr-defined]
    empty_dir(adapter_dir)
    trainer.model.save_pretrained(str(adapter_dir), safe_serialization=True)  # type: ignore[attr-defined]
    return trainer.state.global_step, log.steps_run, resume, log  # type: ignore[attr-defined]
