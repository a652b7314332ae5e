"""The settings of a training run: TrainConfig, its defaults measured on the sample tenant, and
TrainOverrides, the settings a client may change per run, checked before a run is queued."""

import dataclasses
from dataclasses import dataclass
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, ValidationError

from core.errors import Invalid

LinearLayer = Literal["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # of a block
Quantization = Literal["nf4", "none"]
Nf4Weights = Literal["auto", "dequantized", "bitsandbytes"]
ComputeDtype = Literal["auto", "bfloat16", "float32"]
# Preference training (DPO) on the train split's pairs: none, after SFT, or instead of SFT
Preference = Literal["none", "after_sft", "alone"]
# DPO's reference: the adapter SFT left (after_sft only), the frozen base, or the champion as served
PreferenceReference = Literal["sft", "base", "champion"]


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of a run; every field can be overridden per run."""

    rank: int = 16
    alpha: int = 32
    # 0: the LoRA update can be merged into each step's weights (training/qlora.py); dropout on
    # the LoRA input alone was 16% of a CPU step (py-spy) and cannot be merged.
    dropout: float = 0.0
    # rsLoRA: the update scaled by alpha / sqrt(rank) instead of alpha / rank, so that a higher
    # rank does not shrink it; the serving engine and vLLM apply either.
    use_rslora: bool = False
    # Measured on the sample tenant (held-out NLL vs the base): q/k/v/o at 2e-4 for 3 epochs
    # -16%; every linear layer of the blocks at 2e-3: -28% after 3 epochs and -27.6% after 2.
    target_modules: tuple[LinearLayer, ...] = get_args(LinearLayer)
    learning_rate: float = 2e-3
    # Tried beside learning_rate on the validation slice, within PROBE_BUDGET of one run's steps.
    try_learning_rates: tuple[float, ...] = (4e-3,)
    epochs: float = 2.0  # the most; the best epoch by validation NLL is kept
    validation_fraction: float = 0.15  # of the train rows, by a hash of each row; 0: none
    batch_size: int = 8
    max_length: int = 768
    quantization: Quantization = "nf4"  # "none": plain LoRA on unquantized weights
    # How the frozen NF4 weights are applied: dequantized once per run (fast, the memory of the
    # unquantized weights) or by bitsandbytes on every forward and backward; auto: dequantized
    # when that fits in half of the free memory.
    nf4_weights: Nf4Weights = "auto"
    compute_dtype: ComputeDtype = "auto"  # auto: bfloat16 where the hardware has it
    gradient_checkpointing: bool = False
    preference: Preference = "none"
    preference_reference: PreferenceReference = "sft"
    dpo_beta: float = 0.1
    dpo_learning_rate: float = 5e-4
    dpo_epochs: float = 1.0
    seed: int = 0

    @classmethod
    def with_overrides(cls, overrides: dict | None) -> "TrainConfig":
        """The defaults with a run's overrides: TrainOverrides checks their names and types, then
        check() their values."""
        try:
            given = TrainOverrides.model_validate(overrides or {}).model_dump()
        except ValidationError as error:
            known = f"unknown setting (known: {', '.join(TrainOverrides.model_fields)})"
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc']))}: {known if e['type'] == 'extra_forbidden' else e['msg']}"
                for e in error.errors()
            )
            raise Invalid(f"bad training settings: {problems}") from None
        sequences = {name: tuple(given[name]) for name in ("target_modules", "try_learning_rates")}
        config = cls(**given | sequences)
        config.check()
        return config

    def check(self) -> None:
        problems = [
            f"{name} must be {rule}"
            for name, ok, rule in [
                ("rank", 1 <= self.rank <= 256, "between 1 and 256"),
                ("alpha", self.alpha > 0, "positive"),
                ("dropout", 0 <= self.dropout < 1, "in [0, 1)"),
                ("learning_rate", 0 < self.learning_rate < 1, "in (0, 1)"),
                (
                    "try_learning_rates",
                    len(self.try_learning_rates) <= 2 and all(0 < lr < 1 for lr in self.try_learning_rates),
                    "at most two values in (0, 1)",
                ),
                ("validation_fraction", 0 <= self.validation_fraction <= 0.5, "in [0, 0.5]"),
                ("epochs", 0 < self.epochs <= 50, "in (0, 50]"),
                ("batch_size", 1 <= self.batch_size <= 256, "between 1 and 256"),
                ("max_length", 32 <= self.max_length <= 8192, "between 32 and 8192"),
                ("dpo_beta", 0 < self.dpo_beta <= 10, "in (0, 10]"),
                ("dpo_learning_rate", 0 < self.dpo_learning_rate < 1, "in (0, 1)"),
                ("dpo_epochs", 0 < self.dpo_epochs <= 20, "in (0, 20]"),
                (
                    "preference_reference",
                    self.preference_reference != "sft" or self.preference != "alone",
                    "base or champion when preference is alone (there is no SFT adapter to refer to)",
                ),
            ]
            if not ok
        ]
        if problems:
            raise Invalid("; ".join(problems))

    def as_dict(self) -> dict:
        return dataclasses.asdict(self) | {
            "target_modules": list(self.target_modules),
            "try_learning_rates": list(self.try_learning_rates),
        }


class TrainOverrides(BaseModel):
    """The training settings a run may change, as a client sends them: no unknown names, no value
    of another type (no "8" for 8, no string for a list of modules); defaults are TrainConfig's."""

    model_config = ConfigDict(extra="forbid", strict=True)

    rank: int = TrainConfig.rank
    alpha: int = TrainConfig.alpha
    dropout: float = TrainConfig.dropout
    use_rslora: bool = TrainConfig.use_rslora
    target_modules: list[LinearLayer] = Field(list(TrainConfig.target_modules), min_length=1)
    learning_rate: float = TrainConfig.learning_rate
    try_learning_rates: list[PositiveFloat] = list(TrainConfig.try_learning_rates)
    epochs: float = TrainConfig.epochs
    validation_fraction: float = TrainConfig.validation_fraction
    batch_size: int = TrainConfig.batch_size
    max_length: int = TrainConfig.max_length
    quantization: Quantization = TrainConfig.quantization
    nf4_weights: Nf4Weights = TrainConfig.nf4_weights
    compute_dtype: ComputeDtype = TrainConfig.compute_dtype
    gradient_checkpointing: bool = TrainConfig.gradient_checkpointing
    preference: Preference = TrainConfig.preference
    preference_reference: PreferenceReference = TrainConfig.preference_reference
    dpo_beta: float = TrainConfig.dpo_beta
    dpo_learning_rate: float = TrainConfig.dpo_learning_rate
    dpo_epochs: float = TrainConfig.dpo_epochs
    seed: int = TrainConfig.seed
