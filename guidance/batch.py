"""Batched offline decoding: many sequences of one plan per forward (evaluation, search).

The engine serves requests one forward per sequence; evaluation decodes hundreds of prompts
under the same preference, so here S sequences are left-padded into one batch. Each sequence
runs the plan's R rows (policy, pi_ref, pi*, LoRA value rows), so the shared base sees an
(S * R, tokens) batch, sequence-major; standalone value models see (S, tokens).
`greedy_generate` is the plain decode loop; `beam_lookahead` is Sec. 5.6.2's guided
chunk-level beam search.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from guidance.forward import RowOutputs, guidance_term, policy_logprobs
from guidance.plan import DecodePlan, ValueSource
from guidance.sampling import guided_scores
from model_store.loader import LoadedStore


class BatchDecoder:
    """KV caches and attention masks of S sequences that share one plan."""

    def __init__(self, store: LoadedStore, plan: DecodePlan) -> None:
        self.store, self.plan = store, plan
        self.pad_id = store.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = store.tokenizer.eos_token_id or 0
        self.mask: torch.Tensor | None = None  # (S, past tokens), 0 on left padding
        self.shared_cache: object | None = None
        self.standalone_caches: list[object | None] = [None] * len(plan.values)

    @property
    def size(self) -> int:
        return 0 if self.mask is None else int(self.mask.shape[0])

    def prefill(self, prompts: list[list[int]]) -> list[RowOutputs]:
        """Left-pad the prompts into one batch and run them; outputs at each last token."""
        longest = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), longest), dtype=torch.long)
        for i, prompt in enumerate(prompts):
            ids[i, longest - len(prompt) :] = torch.tensor(prompt)
            mask[i, longest - len(prompt) :] = 1
        self.mask = mask.to(self.store.device)
        positions = (self.mask.cumsum(-1) - 1).clamp(min=0)  # (S, T): 0 at each first token
        return self._forward(ids.to(self.store.device), positions)

    def step(self, tokens: list[int]) -> list[RowOutputs]:
        """Append one token per sequence and run it."""
        assert self.mask is not None, "prefill first"
        ones = torch.ones((self.size, 1), dtype=self.mask.dtype, device=self.mask.device)
        self.mask = torch.cat([self.mask, ones], dim=1)
        positions = self.mask.sum(-1, keepdim=True) - 1  # (S, 1)
        ids = torch.tensor(tokens, device=self.store.device)[:, None]
        return self._forward(ids, positions)

    def select(self, sequences: list[int]) -> None:
        """Keep (and repeat) these sequences, in this order: beam search's reorder."""
        index = torch.tensor(sequences, device=self.store.device)
        rows = self.plan.rows
        row_index = (index[:, None] * rows + torch.arange(rows, device=index.device)).flatten()
        self.shared_cache.reorder_cache(row_index)
        for cache in self.standalone_caches:
            if cache is not None:
                cache.reorder_cache(index)
        self.mask = self.mask[index]

    @torch.inference_mode()
    def _forward(self, ids: torch.Tensor, positions: torch.Tensor) -> list[RowOutputs]:
        model, plan, rows = self.store.model, self.plan, self.plan.rows
        self.store.coefficients.set(plan.coefficients.repeat(self.size, 1))  # (S*R, slots)
        try:
            out = model.get_decoder()(
                input_ids=ids.repeat_interleave(rows, 0),  # (S*R, t)
                attention_mask=self.mask.repeat_interleave(rows, 0),
                position_ids=positions.repeat_interleave(rows, 0),
                cache=self.shared_cache,
                use_cache=True,
            )
        finally:
            self.store.coefficients.set(None)
        self.shared_cache = out.cache
        hidden = out.last_hidden_state[:, -1].view(self.size, rows, -1)  # (S, R, hidden)
        lm_rows = plan.logprob_rows
        logits = model.get_output_embeddings()(hidden[:, lm_rows]).float()  # (S, L, vocab)
        logprobs = torch.log_softmax(logits, -1)
        values = [
            self._values(index, source, hidden, ids, positions)
            for index, source in enumerate(plan.values)
        ]  # per source: (S, vocab)
        return [
            RowOutputs(
                {row: logprobs[s, i] for i, row in enumerate(lm_rows)},
                [v[s] for v in values],
            )
            for s in range(self.size)
        ]

    def _values(
        self,
        index: int,
        source: ValueSource,
        hidden: torch.Tensor,  # (S, R, hidden)
        ids: torch.Tensor,  # (S, t)
        positions: torch.Tensor,  # (S, t)
    ) -> torch.Tensor:
        """Values of one explicit source for every sequence: (S, vocab)."""
        if source.model is None:  # LoRA value model: a row of the shared forward
            embedding = self.store.model.get_output_embeddings().weight
            return source.head(hidden[:, source.row], embedding).float()
        out = source.model.get_decoder()(
            input_ids=ids,
            attention_mask=self.mask,
            position_ids=positions,
            cache=self.standalone_caches[index],
            use_cache=True,
        )
        self.standalone_caches[index] = out.cache
        embedding = source.model.get_output_embeddings().weight
        return source.head(out.last_hidden_state[:, -1], embedding).float()


def _scores(plan: DecodePlan, outputs: list[RowOutputs], gamma: float) -> torch.Tensor:
    """Guided log-scores of Eq. (25) per sequence: (S, vocab)."""
    return torch.stack(
        [guided_scores(policy_logprobs(plan, o), guidance_term(plan, o), gamma) for o in outputs]
    )


def greedy_generate(
    store: LoadedStore,
    plan: DecodePlan,
    prompts: list[list[int]],
    max_new_tokens: int,
    gamma: float,
    eos_ids: set[int],
) -> list[list[int]]:
    """Greedy guided decoding of every prompt under one plan; token ids per prompt (an EOS
    ends a sequence and is included)."""
    decoder = BatchDecoder(store, plan)
    outputs = decoder.prefill(prompts)
    generated: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    for step in range(max_new_tokens):
        tokens = _scores(plan, outputs, gamma).argmax(-1).tolist()  # guide -> sample
        for i, token in enumerate(tokens):
            if not done[i]:
                generated[i].append(token)
                done[i] = token in eos_ids
        if all(done) or step == max_new_tokens - 1:
            break
        outputs = decoder.step(tokens)  # forward
    return generated


@dataclass(frozen=True)
class BeamSettings:
    """Guided beam lookahead of Sec. 5.6.2 ("MAGE-I-M-b4c1l10")."""

    width: int = 4
    """b: beams kept after each chunk."""
    expansion: int = 1
    """c: continuations sampled from each kept beam."""
    interval: int = 10
    """l: tokens per chunk between two selections."""
    seed: int = 0
    """Seed of the chunk sampling."""


def _beam_score(plan: DecodePlan, out: RowOutputs, token: int) -> tuple[float, bool]:
    """(increment, replaces) of a beam's score for choosing `token`.

    Implicit guidance scores a beam by its summed log pi*/pi_ref (the implicit reward of
    Eq. 23, as in weak-to-strong search); explicit guidance by the value of the latest token,
    which Eq. (16) trains to predict the final reward; no guidance by the policy likelihood.
    """
    term = guidance_term(plan, out)
    if plan.values:
        return float(term[token]), True
    if term is not None:
        return float(term[token]), False
    return float(policy_logprobs(plan, out)[token]), False


def beam_lookahead(
    store: LoadedStore,
    plan: DecodePlan,
    prompts: list[list[int]],
    max_new_tokens: int,
    gamma: float,
    eos_ids: set[int],
    settings: BeamSettings,
) -> list[tuple[list[int], float]]:
    """Chunk-level beam search for several prompts in one batch: every beam samples
    `expansion` continuations of `interval` tokens from the guided distribution
    softmax(log pi + gamma V) (Eq. 25); per prompt, the `width` best-scoring candidates
    survive each chunk. Returns per prompt its best beam and that beam's score."""
    b, c = settings.width, settings.expansion
    group = b * c  # candidates per prompt; sequence i belongs to prompt i // group
    generator = torch.Generator(device="cpu").manual_seed(settings.seed)
    decoder = BatchDecoder(store, plan)
    first = decoder.prefill(prompts)
    start = [p for p in range(len(prompts)) for _ in range(group)]
    decoder.select(start)
    outputs = [first[p] for p in start]
    beams: list[list[int]] = [[] for _ in start]
    scores, done = [0.0] * len(start), [False] * len(start)

    def best_per_prompt() -> list[tuple[list[int], float]]:
        firsts = range(0, len(beams), group)
        best = [max(range(f, f + group), key=scores.__getitem__) for f in firsts]
        return [(beams[i], scores[i]) for i in best]

    while True:
        for _ in range(settings.interval):
            probs = torch.softmax(_scores(plan, outputs, gamma), -1).cpu()  # (S, vocab)
            tokens = torch.multinomial(probs, 1, generator=generator)[:, 0].tolist()
            for i, token in enumerate(tokens):
                if done[i]:
                    tokens[i] = beams[i][-1]
                    continue
                increment, replaces = _beam_score(plan, outputs[i], token)
                scores[i] = increment if replaces else scores[i] + increment
                beams[i].append(token)
                done[i] = token in eos_ids
            if all(done) or max(len(beam) for beam in beams) >= max_new_tokens:
                return best_per_prompt()
            outputs = decoder.step(tokens)
        chosen = []
        for first_index in range(0, len(beams), group):
            members = range(first_index, first_index + group)
            keep = sorted(members, key=scores.__getitem__, reverse=True)[:b]
            chosen += [k for k in keep for _ in range(c)]
        decoder.select(chosen)
        beams = [list(beams[k]) for k in chosen]
        scores, done = [scores[k] for k in chosen], [done[k] for k in chosen]
        outputs = [outputs[k] for k in chosen]
