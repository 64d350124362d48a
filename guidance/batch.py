"""One batched step over sequences with different plans: forward, outputs, guided scores.

Members (the engine's sequences, or a search's beams) each bring a DecodePlan and a gamma.
Their rows share one padded KV lane of the shared base (guidance.kv), member-major, and the
coefficient matrix stacks every plan's rows, so one forward runs every preference, guidance
mode and merge method at once (model_store.multi_lora). Standalone value models get a lane
each, shared by all members that need that model.

A step: forward the new tokens -> outputs (K, vocab): the log-probabilities of every row a
plan reads and the values of every value source, scored against the output embedding in one
product -> guided scores (members, vocab), each member's weighted sum of its outputs (Eq. 25).
Value heads are never merged per preference: each value row mixes the store's heads
(model_store.value_head.HeadBank), so a new preference costs only its coefficient rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch.nn import functional

from guidance.kv import KVLane
from guidance.plan import DecodePlan
from model_store.loader import LoadedStore


class Member(Protocol):
    """What the batch reads of a sequence. A member may also carry `prefill_logprobs`, a
    list: the prefill then appends its prompt-token log-probabilities (see
    `_prompt_logprobs`)."""

    plan: DecodePlan
    gamma: float


class Prefix(Protocol):
    """Cached KV a batch's lanes start from (guidance.prefix_cache.CachedPrefix)."""

    def restore(self, batch: Batch) -> None: ...


@dataclass(frozen=True)
class Layout:
    """Where each member's rows and outputs sit; rebuilt only when members change."""

    base_rows: list[range]
    """Per member, its rows of the base lane."""
    base_member: list[int]
    """Per base-lane row, its member."""
    lane_rows: dict[int, list[tuple[int, int]]]
    """Per standalone lane, its rows as (member, value source)."""
    coefficients: torch.Tensor
    """(rows, adapter slots): every member's plan rows, stacked."""
    active: list[int]
    """Adapter slots with a non-zero coefficient in some row."""
    lm_rows: torch.Tensor
    """(K_lm,) base rows scored as next-token log-probabilities."""
    value_rows: torch.Tensor
    """(K_v,) base rows of LoRA value sources."""
    value_weights: torch.Tensor
    """(K_v, objectives) in model dtype: each source's mix of the store's value heads."""
    standalone: list[tuple[int, int, torch.Tensor]]
    """Standalone value sources: (lane key, lane row, head mix (1, objectives))."""
    term_index: torch.Tensor
    """(members, terms) long: outputs each member's score sums (padding: weight 0)."""
    policy_weight: torch.Tensor
    """(members, terms) float32: the terms' weights in log pi."""
    guidance_weight: torch.Tensor
    """(members, terms) float32: the terms' weights in V."""
    gamma: torch.Tensor
    """(members, 1) float32: each member's gamma."""


def combine(outputs: torch.Tensor, index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(members, vocab) = per member, sum_t weight[t] * outputs[index[t]], in term order.

    Padding terms point at the member's own first output with weight 0, so a broken row
    of one member can never leak into another's score."""
    scores = weight[:, :1] * outputs[index[:, 0]]
    for t in range(1, index.shape[1]):
        scores = scores + weight[:, t : t + 1] * outputs[index[:, t]]
    return scores


class Batch:
    """The KV lanes and layout of a set of members."""

    def __init__(self, store: LoadedStore) -> None:
        self.store = store
        self.members: list[Member] = []
        self.base = KVLane(store.model.get_decoder(), store.device)
        self.lanes: dict[int, KVLane] = {}
        self.lane_models: dict[int, torch.nn.Module] = {}
        self._layout: Layout | None = None
        self._prompts: tuple[torch.Tensor, torch.Tensor, list[int]] | None = None
        self.cursor = 0  # prefill columns done
        self._every_position: torch.Tensor | None = None  # (rows, width, hidden), opt-in

    def __len__(self) -> int:
        return len(self.members)

    @property
    def rows(self) -> int:
        return self.base.rows

    def nbytes(self) -> int:
        """KV bytes held by every lane."""
        return self.base.nbytes() + sum(lane.nbytes() for lane in self.lanes.values())

    @property
    def layout(self) -> Layout:
        if self._layout is None:
            self._layout = build_layout(self.store, self.members)
        return self._layout

    def replanned(self) -> None:
        """A member's plan changed to one with the same rows and lanes (a preference changed
        while it runs): its coefficients and score weights are read anew at the next step;
        the KV stays."""
        self._layout = None

    # --- membership -------------------------------------------------------------------
    def extend(self, other: Batch) -> None:
        """Take over the members and KV of `other` (a prefilled batch of the same store)."""
        self.base.join(other.base)
        for key, lane in other.lanes.items():
            if key not in self.lanes:
                self.lanes[key] = KVLane(lane.decoder, self.store.device)
                self.lane_models[key] = other.lane_models[key]
            self.lanes[key].join(lane)
        self.members = self.members + other.members
        self._layout = None

    def keep(self, index: list[int]) -> None:
        """Keep these members, in this order (repeats allowed), freeing the others' KV."""
        layout = self.layout
        self.base.keep([row for m in index for row in layout.base_rows[m]])
        for key in list(self.lanes):
            rows = layout.lane_rows[key]
            kept = [i for m in index for i, (owner, _) in enumerate(rows) if owner == m]
            self.lanes[key].keep(kept)
            if not kept:
                del self.lanes[key], self.lane_models[key]
        self.members = [self.members[m] for m in index]
        self._layout = None
        if self._prompts is not None:  # mid-prefill: the prompt matrix follows its members
            ids, mask, lengths = self._prompts
            rows = torch.tensor(index, dtype=torch.long, device=ids.device)  # [] is float
            self._prompts = (ids[rows], mask[rows], [lengths[m] for m in index])

    # --- prefill ------------------------------------------------------------------------
    def start(
        self, members: list[Member], prompts: list[list[int]], prefix: Prefix | None = None
    ) -> None:
        """Make this (empty) batch prefill `prompts`, left-padded to the longest. With a
        cached `prefix` (one member; guidance.prefix_cache), the lanes start from its KV and
        `prompts` holds only the tokens after it."""
        assert not self.members, "prefill starts on an empty batch"
        self.members = list(members)
        self._layout = None
        for member in members:
            if getattr(member, "prefill_logprobs", None) is not None:
                member.prefill_logprobs.clear()  # a retried prefill starts over
            for source in member.plan.values:
                model = source.model
                if model is not None and id(model) not in self.lanes:
                    self.lanes[id(model)] = KVLane(model.get_decoder(), self.store.device)
                    self.lane_models[id(model)] = model
        if prefix is not None:
            prefix.restore(self)
        else:
            self.base.open(len(self.layout.base_member))
            for key, lane in self.lanes.items():
                lane.open(len(self.layout.lane_rows[key]))
        longest = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), longest), self._pad_id(), dtype=torch.long)
        mask = torch.zeros((len(prompts), longest), dtype=torch.long)
        for i, prompt in enumerate(prompts):
            ids[i, longest - len(prompt) :] = torch.tensor(prompt)
            mask[i, longest - len(prompt) :] = 1
        device = self.store.device
        self._prompts = (ids.to(device), mask.to(device), [len(p) for p in prompts])
        self.cursor = 0

    @property
    def prefill_left(self) -> int:
        """Prompt columns still to prefill."""
        return 0 if self._prompts is None else self._prompts[0].shape[1] - self.cursor

    def prefill(self, width: int) -> torch.Tensor | None:
        """Run the next `width` prompt columns; the outputs (K, vocab) once the last is done."""
        assert self._prompts is not None, "start first"
        ids, mask, lengths = self._prompts
        start, longest = self.cursor, ids.shape[1]
        stop = min(longest, start + width)
        # Each member's real tokens sit in its last len(prompt) columns.
        real = [max(0, stop - max(start, longest - n)) for n in lengths]
        asking = [m for m, member in enumerate(self.members) if _asks(member)]
        outputs = self._step(ids[:, start:stop], mask[:, start:stop], real, bool(asking))
        if asking:
            self._prompt_logprobs(asking, start, stop)
        self.cursor = stop
        if stop < longest:
            return None
        self._prompts = None
        return outputs

    # --- decode -------------------------------------------------------------------------
    def decode(self, tokens: list[int]) -> torch.Tensor:
        """Append one token per member; returns the outputs (K, vocab)."""
        ids = torch.tensor(tokens, device=self.store.device)[:, None]  # (members, 1)
        return self._step(ids, torch.ones_like(ids), [1] * len(tokens))

    def scores(self, outputs: torch.Tensor) -> torch.Tensor:
        """Guided scores log pi + gamma V (Eq. 25) per member: (members, vocab)."""
        layout = self.layout
        weight = layout.policy_weight + layout.gamma * layout.guidance_weight
        return combine(outputs, layout.term_index, weight)

    def parts(self, outputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """log pi and V separately, (members, vocab) each (beam search scores beams by V)."""
        layout = self.layout
        return (
            combine(outputs, layout.term_index, layout.policy_weight),
            combine(outputs, layout.term_index, layout.guidance_weight),
        )

    # --- internals ----------------------------------------------------------------------
    def _pad_id(self) -> int:
        tokenizer = self.store.tokenizer
        pad = tokenizer.pad_token_id
        return pad if pad is not None else (tokenizer.eos_token_id or 0)

    @torch.inference_mode()
    def _step(
        self, ids: torch.Tensor, mask: torch.Tensor, real: list[int], every: bool = False
    ) -> torch.Tensor:
        """Forward a block (members, width) through every lane; the step's outputs. With
        `every`, the base lane's hidden states of every column are kept for
        `_prompt_logprobs`."""
        layout, store = self.layout, self.store
        rows = torch.tensor(layout.base_member, device=store.device)
        store.coefficients.set(layout.coefficients, layout.active)
        try:
            reals = [real[m] for m in layout.base_member]
            hidden = self.base.forward(ids[rows], mask[rows], reals, every_position=every)
        finally:
            store.coefficients.set(None)
        if every:
            self._every_position, hidden = hidden, hidden[:, -1]
        lane_hidden = {}
        for key, lane in self.lanes.items():
            owners = [m for m, _ in layout.lane_rows[key]]
            index = torch.tensor(owners, device=store.device)
            lane_hidden[key] = lane.forward(ids[index], mask[index], [real[m] for m in owners])
        return self._outputs(hidden, lane_hidden)

    def _outputs(self, hidden: torch.Tensor, lane_hidden: dict[int, torch.Tensor]) -> torch.Tensor:
        """(K, vocab): log pi of the lm rows, then the values of LoRA and standalone sources."""
        layout, bank, head = self.layout, self.store.value_bank, self.store.output_head
        rows = hidden[layout.lm_rows]  # (K_lm, hidden)
        k_lm, k_v = rows.shape[0], layout.value_rows.shape[0]
        tied = k_v and bank.kind == "tied"
        if tied:  # V = E (sum_i w_i (P_i h + p_i)) + sum_i w_i c_i: one product with E for all
            projected = bank.project(hidden[layout.value_rows], layout.value_weights)
            rows = torch.cat([rows, projected])
        products = functional.linear(rows, head.weight)  # (K_lm [+ K_v], vocab)
        # log pi from the model's own logits: its bias and its scale or soft-cap (Cohere,
        # Granite, Gemma 2/3), never from E h alone; value heads score plain E (Sec. 3.4.1).
        logits = products[:k_lm] if head.bias is None else products[:k_lm] + head.bias
        parts = [torch.log_softmax(head.finish(logits).float(), -1)]
        if tied:
            parts.append((products[k_lm:] + bank.out_bias(layout.value_weights)).float())
        elif k_v:
            values = bank(hidden[layout.value_rows], layout.value_weights, head.weight)
            parts.append(values.float())
        for key, row, weights in layout.standalone:
            own = self.lane_models[key].get_output_embeddings().weight
            parts.append(bank(lane_hidden[key][row][None], weights, own).float())
        return torch.cat(parts)

    # --- prompt log-probabilities (opt-in: TGI's decoder_input_details) -------------------
    @torch.inference_mode()
    def _prompt_logprobs(self, asking: list[int], start: int, stop: int) -> None:
        """For each asking member, log pi(prompt token | its prefix) of the tokens this chunk
        predicts, appended to its `prefill_logprobs` (on the device; the engine reads them
        once, when the request finishes). pi is the member's policy, unguided: guidance
        scores next tokens, not the prompt."""
        full, self._every_position = self._every_position, None
        ids, _, lengths = self._prompts
        longest = ids.shape[1]
        for m in asking:
            # Column c predicts token c + 1; only real columns with a real successor count.
            first, last = max(start, longest - lengths[m]), min(stop, longest - 1)
            if first < last:
                rows = [full[r, first - start : last - start] for r in self.layout.base_rows[m]]
                logprobs = self._policy_logprobs(rows, self.members[m].plan)
                targets = ids[m, first + 1 : last + 1]
                self.members[m].prefill_logprobs.append(logprobs.gather(1, targets[:, None])[:, 0])

    def _policy_logprobs(self, hidden: list[torch.Tensor], plan: DecodePlan) -> torch.Tensor:
        """(columns, vocab) log pi from a member's rows' hidden states: its one Bone Soup
        row, or MOD's sum_i mu_i log pi_i renormalised."""
        head = self.store.output_head
        total = None
        for row, weight in zip(plan.policy_rows, plan.policy_mix, strict=True):
            part = weight * torch.log_softmax(head.logits(hidden[row]).float(), -1)
            total = part if total is None else total + part
        return torch.log_softmax(total, -1) if len(plan.policy_rows) > 1 else total


def _asks(member: Member) -> bool:
    return getattr(member, "prefill_logprobs", None) is not None


def build_layout(store: LoadedStore, members: list[Member]) -> Layout:
    """Number every member's rows and outputs; one pass over the plans."""
    base_rows, base_member, coefficients = [], [], []
    lane_rows: dict[int, list[tuple[int, int]]] = {}
    lm_rows: list[int] = []
    value_rows: list[int] = []
    value_weights: list[tuple[float, ...]] = []
    standalone: list[tuple[int, int, torch.Tensor]] = []
    outputs_of: list[list[tuple[str, int]]] = []  # per member: (kind, position) per output
    first = 0
    for m, member in enumerate(members):
        plan = member.plan
        base_rows.append(range(first, first + plan.rows))
        base_member += [m] * plan.rows
        coefficients.append(plan.coefficients)
        own = [("lm", len(lm_rows) + i) for i in range(len(plan.logprob_rows))]
        lm_rows += [first + row for row in plan.logprob_rows]
        for k, source in enumerate(plan.values):
            if source.model is not None:
                rows = lane_rows.setdefault(id(source.model), [])
                own.append(("standalone", len(standalone)))
                weights = torch.tensor([source.weights], device=store.device, dtype=store.dtype)
                standalone.append((id(source.model), len(rows), weights))
                rows.append((m, k))
            else:
                own.append(("value", len(value_rows)))
                value_rows.append(first + source.row)
                value_weights.append(source.weights)
        outputs_of.append(own)
        first += plan.rows
    offset = {"lm": 0, "value": len(lm_rows), "standalone": len(lm_rows) + len(value_rows)}
    width = max(len(member.plan.terms) for member in members)
    index = torch.zeros((len(members), width), dtype=torch.long)
    policy = torch.zeros((len(members), width))
    guidance = torch.zeros((len(members), width))
    for m, member in enumerate(members):
        own = [offset[kind] + position for kind, position in outputs_of[m]]
        index[m] = own[0]  # padding terms: the member's own first output, weight 0
        for t, term in enumerate(member.plan.terms):
            index[m, t], policy[m, t], guidance[m, t] = own[term.output], term.policy, term.guidance
    device = store.device
    active = sorted({slot for member in members for slot in member.plan.active_slots})
    return Layout(
        base_rows=base_rows,
        base_member=base_member,
        lane_rows=lane_rows,
        coefficients=torch.cat(coefficients),
        active=active,
        lm_rows=torch.tensor(lm_rows, dtype=torch.long, device=device),
        value_rows=torch.tensor(value_rows, dtype=torch.long, device=device),
        value_weights=torch.tensor(
            value_weights or [[0.0] * store.n_objectives], device=device, dtype=store.dtype
        )[: len(value_weights)],
        standalone=standalone,
        term_index=index.to(device),
        policy_weight=policy.to(device),
        guidance_weight=guidance.to(device),
        gamma=torch.tensor([[member.gamma] for member in members], device=device),
    )
