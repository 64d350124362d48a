"""The ``hf-classifier:/path[:label_index]`` adapter: a local sequence-classification model.

The folder must hold a Hugging Face ``AutoModelForSequenceClassification`` checkpoint with
``model.safetensors`` weights (pickled ``pytorch_model.bin`` files are refused) and its
tokenizer. Nothing is downloaded and no remote code is run. The prompt and the response are
encoded as a text pair (``tokenizer(prompt, response)``, truncated longest-first to the model's
maximum length) and the score is the logit of ``label_index`` (default: the last label, which is
the only one for the usual single-logit reward models).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from objectives.rewards.base import Reward, RewardError, RewardSpecError


class HFClassifierReward(Reward):
    """Logit of one label of a local sequence-classification model, scoring (prompt, response)."""

    batch_size = 16

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        label_index: int | None = None,
        name: str | None = None,
        device: str = "cpu",
        max_length: int | None = None,
        batch_size: int | None = None,
    ) -> None:
        self.path = Path(path).expanduser()
        super().__init__(name or f"hf-classifier:{self.path}", batch_size=batch_size)
        if not self.path.is_dir():
            raise RewardSpecError(self.name, f"model folder {str(self.path)!r} does not exist")
        self.label_index = label_index
        self.device = device
        self.max_length = max_length

    def _load(self) -> Any:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if not any(self.path.glob("*.safetensors")):
            raise RewardError(
                self.name,
                f"no *.safetensors weights in {self.path}; only safetensors checkpoints are "
                "loaded (convert pickled pytorch_model.bin files first)",
            )
        tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        model = AutoModelForSequenceClassification.from_pretrained(
            self.path, local_files_only=True, use_safetensors=True, trust_remote_code=False
        )
        model.to(self.device).eval()

        num_labels = int(model.config.num_labels)
        label = num_labels - 1 if self.label_index is None else self.label_index
        if not -num_labels <= label < num_labels:
            raise RewardError(
                self.name, f"label index {label} out of range: the model has {num_labels} labels"
            )
        label %= num_labels

        # Decoder reward models (GPT-2, Llama, ...) often ship without a pad token; the model
        # needs one to find each sequence's last real token in a padded batch.
        pad_one_by_one = False
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is not None:
                tokenizer.pad_token = tokenizer.eos_token
            else:
                pad_one_by_one = True
        if model.config.pad_token_id is None and tokenizer.pad_token_id is not None:
            model.config.pad_token_id = tokenizer.pad_token_id

        max_length = self.max_length
        if max_length is None:
            candidates = [getattr(model.config, "max_position_embeddings", None)]
            if tokenizer.model_max_length and tokenizer.model_max_length < 1_000_000:
                candidates.append(tokenizer.model_max_length)
            known = [c for c in candidates if c]
            max_length = min(known) if known else None
        return tokenizer, model, label, max_length, pad_one_by_one, torch

    def _score(self, state: Any, prompts: list[str], responses: list[str]) -> list[float]:
        tokenizer, model, label, max_length, pad_one_by_one, torch = state
        if pad_one_by_one and len(prompts) > 1:
            return [
                self._score(state, [p], [r])[0] for p, r in zip(prompts, responses, strict=True)
            ]
        batch = tokenizer(
            prompts,
            responses,
            padding=len(prompts) > 1,
            truncation="longest_first" if max_length else False,
            max_length=max_length,
            return_tensors="pt",
        ).to(self.device)
        with torch.inference_mode():
            logits = model(**batch).logits
        return logits[:, label].float().tolist()
