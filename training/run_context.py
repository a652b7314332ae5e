"""What every phase of one attempt at a training run works with (training/pipeline.py runs the
phases, training/run_evaluation.py evaluates the candidate), and how a run reports progress."""

from collections.abc import Callable
from dataclasses import dataclass

from core.settings import Settings
from training import attempts
from training.config import TrainConfig

Echo = Callable[[str], None]


@dataclass(frozen=True)
class RunContext:
    """What every phase of one attempt at a run works with."""

    attempt: attempts.Attempt
    tenant_id: int
    config: TrainConfig
    settings: Settings
    echo: Echo
    composition: dict | None = None  # the run combines these adapters instead of training (training/compose.py)

    @property
    def run_id(self) -> int:
        return self.attempt.run_id
