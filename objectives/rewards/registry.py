"""A flat registry of rewards, addressed by spec strings.

A spec is one of:

* a registered name, e.g. ``"relevance"``, ``"positivity"``, ``"brevity"``;
* ``"hf-classifier:/path/to/folder"`` or ``"hf-classifier:/path/to/folder:LABEL"``: a local
  Hugging Face sequence-classification model, scored by the logit of label ``LABEL``
  (default: the last one);
* ``"package.module:function"``: any importable callable ``fn(prompts, responses)`` returning
  one float per pair (``function`` may be a dotted attribute path, e.g. ``mod:Class.method``).

``get_reward`` returns one cached instance per spec, so a heavy model is loaded once per process
(on the first call, not at lookup). The built-ins are registered when ``objectives.rewards`` is
imported (cheaply: nothing heavy is imported until a reward is first called).
"""

from __future__ import annotations

import importlib
import re
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from objectives.rewards.base import FunctionReward, Reward, RewardSpecError

HF_CLASSIFIER_PREFIX = "hf-classifier:"
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")
_RESERVED = {"hf-classifier"}

_factories: dict[str, Callable[[], Reward]] = {}
_instances: dict[str, Reward] = {}
_lock = threading.Lock()

T = TypeVar("T")


def register_reward(name: str, *, overwrite: bool = False) -> Callable[[T], T]:
    """Decorator registering a reward under ``name``; returns the decorated object unchanged.

    It decorates a :class:`Reward` subclass (instantiated with no arguments on lookup), a
    ``Reward`` instance, or a plain function ``fn(prompts, responses) -> list[float]``.
    Names are lower-case ``[a-z0-9_.-]`` and may not contain ``:`` (reserved for adapters).
    """
    if not _NAME_RE.match(name) or name in _RESERVED:
        raise ValueError(
            f"invalid reward name {name!r}: use lower-case letters, digits, '_', '.', '-' "
            f"(not {sorted(_RESERVED)})"
        )

    def decorator(obj: T) -> T:
        factory: Callable[[], Reward]
        if isinstance(obj, type) and issubclass(obj, Reward):
            cls = obj

            def factory() -> Reward:
                reward = cls()
                reward.name = name
                return reward

        elif isinstance(obj, Reward):
            instance = obj

            def factory() -> Reward:
                return instance

        elif callable(obj):
            fn = obj

            def factory() -> Reward:
                return FunctionReward(name, fn)  # type: ignore[arg-type]

        else:
            raise TypeError(f"cannot register {obj!r} as reward {name!r}: not a Reward or callable")
        with _lock:
            if name in _factories and not overwrite:
                raise ValueError(f"reward {name!r} is already registered (pass overwrite=True)")
            _factories[name] = factory
            _instances.pop(name, None)
        return obj

    return decorator


def unregister_reward(name: str) -> None:
    """Remove a registered reward (mainly for tests); unknown names are ignored."""
    with _lock:
        _factories.pop(name, None)
        _instances.pop(name, None)


def available_rewards() -> list[str]:
    """Registered reward names, sorted (the adapter forms are always available as well)."""
    return sorted(_factories)


def clear_reward_cache() -> None:
    """Forget the cached reward instances (and the models they hold)."""
    with _lock:
        _instances.clear()


def get_reward(spec: str) -> Reward:
    """The reward a spec names; see the module docstring for the spec forms.

    Raises :class:`RewardSpecError` (a ``ValueError``) for unknown or malformed specs, with a
    message listing the available rewards.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise RewardSpecError(str(spec), f"a reward spec must be a non-empty string. {_help()}")
    spec = spec.strip()
    with _lock:
        cached = _instances.get(spec)
    if cached is not None:
        return cached
    reward = _build(spec)
    with _lock:
        return _instances.setdefault(spec, reward)


def _build(spec: str) -> Reward:
    factory = _factories.get(spec)
    if factory is not None:
        return factory()
    if spec.startswith(HF_CLASSIFIER_PREFIX):
        return _build_hf_classifier(spec)
    if ":" in spec:
        return _build_callable(spec)
    raise RewardSpecError(spec, f"unknown reward. {_help()}")


def _build_hf_classifier(spec: str) -> Reward:
    from objectives.rewards.adapters import HFClassifierReward

    rest = spec[len(HF_CLASSIFIER_PREFIX) :]
    label: int | None = None
    head, sep, tail = rest.rpartition(":")
    if sep and re.fullmatch(r"-?\d+", tail):
        rest, label = head, int(tail)
    if not rest:
        raise RewardSpecError(
            spec, "expected 'hf-classifier:/path/to/model[:label_index]' but the path is empty"
        )
    return HFClassifierReward(rest, label_index=label, name=spec)


def _build_callable(spec: str) -> Reward:
    module_name, _, attr_path = spec.partition(":")
    if not module_name or not attr_path:
        raise RewardSpecError(spec, f"expected 'module:function'. {_help()}")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise RewardSpecError(
            spec, f"cannot import module {module_name!r} ({exc}). {_help()}"
        ) from exc
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise RewardSpecError(
                spec, f"module {module_name!r} has no attribute {attr_path!r}"
            ) from None
    if isinstance(obj, Reward):
        return obj
    if isinstance(obj, type) and issubclass(obj, Reward):
        return obj()
    if not callable(obj):
        raise RewardSpecError(spec, f"{attr_path!r} in {module_name!r} is not callable")
    return FunctionReward(spec, obj)


def _help() -> str:
    names = ", ".join(sorted(_factories)) or "(none)"
    return (
        f"Available rewards: {names}; or 'hf-classifier:/path/to/model[:label_index]' "
        "or 'module:function'."
    )
