"""Where a run stands, as the engine tells a method's hooks each step."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Progress:
    """Everything a method's schedules and seeded draws may depend on, so that no method
    reads the training loop's config (``train.epochs``, ``train.seed``) or the process group.
    A resumed run rebuilds it from the step alone, so its hooks see what an uninterrupted
    run's did."""

    step: int  # optimiser steps taken before this one
    total_steps: int
    steps_per_epoch: int
    seed: int = 0  # train.seed
    rank: int = 0  # this process's rank

    def __post_init__(self) -> None:
        if self.steps_per_epoch < 1 or self.total_steps < 0 or self.step < 0:
            raise ValueError(f"not a run's progress: {self}")

    @property
    def epoch(self) -> int:
        """The 0-based epoch this step belongs to."""
        return self.step // self.steps_per_epoch
