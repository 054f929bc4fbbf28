"""The selfplay stage's GRPO options: its config as ``selftrain.training.grpo`` takes it.

GRPO itself (rollout hook, guarded rewards, TRL's trainer) lives in ``selftrain.training.grpo``.
"""

from __future__ import annotations

from selftrain.training.grpo import GRPOOptions


def grpo_options(config) -> GRPOOptions:
    """``GRPOOptions`` from a ``SelfplayConfig``."""
    return GRPOOptions(
        max_steps=config.max_steps, learning_rate=config.learning_rate, groups_per_step=config.groups_per_step,
        num_generations=config.num_generations, completion_tokens=config.completion_tokens,
        temperature=config.temperature, beta=config.beta, loss_type=config.loss_type,
        scale_rewards=config.scale_rewards, lr_scheduler=config.lr_scheduler, warmup_steps=config.warmup_steps,
        max_reward_failures=config.max_reward_failures, generation_batch_size=config.generation_batch_size,
        precision=config.precision, adapter=config.adapter,
    )
