"""Training core: partitioning (mesh + logical axis rules), the jit train loop, checkpoints, metrics."""

from persona_jax.train.checkpointing import Checkpointer, CheckpointReadError
from persona_jax.train.losses import lm_loss, token_log_probs, weighted_cross_entropy
from persona_jax.train.optim import learning_rate_schedule, make_optimizer
from persona_jax.train.partitioning import (LOGICAL_AXIS_RULES, make_mesh,
                                            maybe_initialize_distributed)
from persona_jax.train.trainer import (PREEMPTED_EXIT_CODE, DataIterator, NonFiniteLossError,
                                       Preempted, StuckTrainingError, TrainConfig, Trainer,
                                       TrainResult, TrainState, clear_preemption, raise_if_preempted,
                                       was_preempted)

__all__ = [
    "PREEMPTED_EXIT_CODE", "Preempted", "StuckTrainingError", "CheckpointReadError", "clear_preemption",
    "raise_if_preempted", "was_preempted",
    "Checkpointer", "DataIterator", "LOGICAL_AXIS_RULES", "NonFiniteLossError", "TrainConfig",
    "TrainResult", "TrainState", "Trainer", "learning_rate_schedule", "lm_loss", "make_mesh",
    "make_optimizer", "maybe_initialize_distributed", "token_log_probs", "weighted_cross_entropy",
]
