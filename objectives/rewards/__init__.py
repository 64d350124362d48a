"""Reward functions of (prompt, response) pairs, for training, evaluation and guidance.

    >>> from objectives.rewards import get_reward
    >>> get_reward("brevity")(["Hi?"], ["Hello there."])
    [1.0]

A reward is a named, lazily loaded, batched callable ``reward(prompts, responses) ->
list[float]``. Look rewards up by spec with :func:`get_reward` (registered names such as
``relevance``, ``positivity``, ``brevity``; ``hf-classifier:/path[:label_index]``;
``module:function``), list them with :func:`available_rewards`, and add new ones with the
:func:`register_reward` decorator. Failures raise :class:`RewardError`.
"""

# ``builtin`` registers the built-in rewards; importing it is cheap (models load on first use).
from objectives.rewards import builtin  # noqa: F401
from objectives.rewards.base import FunctionReward, Reward, RewardError, RewardSpecError
from objectives.rewards.registry import (
    available_rewards,
    clear_reward_cache,
    get_reward,
    register_reward,
    unregister_reward,
)

__all__ = [
    "FunctionReward",
    "Reward",
    "RewardError",
    "RewardSpecError",
    "available_rewards",
    "clear_reward_cache",
    "get_reward",
    "register_reward",
    "unregister_reward",
]
