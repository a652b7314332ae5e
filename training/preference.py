"""Preference training: TRL's DPOTrainer on the train split's pairs (the reviewer's text chosen
over the draft it replaced), on the same LoRA adapter and base as SFT (training/train.py).

After SFT, DPO goes on training the adapter SFT left; alone, it trains a fresh one. Its
reference is one of PreferenceReference: the adapter as SFT left it (TRL's own choice for a
PEFT model, a frozen copy named "ref"), the frozen base (the adapter disabled), or the
champion as it is served (loaded beside the trained adapter as "ref"). Only the pairs of the
rows SFT fits on are used: the validation slice stays unseen by both stages.
"""

import math
import tempfile

from transformers import PreTrainedModel, TrainerCallback

from agent.adapters import AdapterRef, set_scale
from training import qlora
from training.config import TrainConfig
from training.qlora import Training

REFERENCE_ADAPTER = "ref"  # the name TRL's DPOTrainer looks up for a PEFT model's reference


def sft_row(pair: dict) -> dict:
    """The SFT row a pair was made from (training/dataset.preference_pair)."""
    return {"prompt": pair["prompt"], "completion": pair["chosen"]}


def dpo_steps(pairs: int, config: TrainConfig) -> int:
    return math.ceil(pairs / pair_batch_size(config)) * math.ceil(config.dpo_epochs)


def pair_batch_size(config: TrainConfig) -> int:
    """Pairs per step: each is two sequences, so a step holds as many sequences as an SFT step."""
    return max(1, config.batch_size // 2)


class _Progress(TrainerCallback):
    def __init__(self, training: Training, offset: int):
        self.training, self.offset = training, offset
        self.history: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            entry = {"step": self.offset + state.global_step, "loss": round(logs["loss"], 4), "stage": "dpo"}
            for name in ("rewards/accuracies", "rewards/margins"):
                if name in logs:
                    entry[name.split("/")[1]] = round(logs[name], 4)
            self.history.append(entry)
            self.training.progress(self.offset + state.global_step, self.training.total_steps, logs["loss"])


def train_preferences(
    model: PreTrainedModel, pairs: list[dict], champion: AdapterRef | None, training: Training, *, offset: int
) -> tuple[PreTrainedModel, dict]:
    """DPO on `pairs` over `model`: the PeftModel SFT trained (after_sft) or the bare base (alone),
    its steps reported after the `offset` steps before it. Returns the PeftModel with the trained
    adapter active and what the stage did."""
    from datasets import Dataset
    from peft import PeftModel
    from trl import DPOConfig, DPOTrainer

    config = training.config
    after_sft = isinstance(model, PeftModel)
    watch = _Progress(training, offset)
    with tempfile.TemporaryDirectory(prefix="draftloop-dpo-") as scratch:
        args = DPOConfig(
            output_dir=scratch,
            num_train_epochs=config.dpo_epochs,
            per_device_train_batch_size=pair_batch_size(config),
            learning_rate=config.dpo_learning_rate,
            beta=config.dpo_beta,
            **qlora.trainer_arguments(config),
        )
        trainer = DPOTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(pairs),
            processing_class=training.tokenizer,
            peft_config=None if after_sft else qlora.fresh_lora(config),
            callbacks=[watch],
        )
        reference = _set_reference(trainer.model, config, champion)
        # Cast to the compute dtype as they are, never rounded through bf16: after SFT they are the
        # weights SFT trained, and rounding would lose what it learnt. (Alone on NF4 that leaves the
        # two NF4 paths starting DPO from slightly different weights, as they always have.)
        qlora.train(trainer, config, round_through_bf16=False)
    trained = trainer.model
    if REFERENCE_ADAPTER in trained.peft_config:
        trained.delete_adapter(REFERENCE_ADAPTER)  # the saved folder holds the trained adapter alone
    return trained, {
        "pairs": len(pairs),
        "steps": trainer.state.global_step,
        "reference": reference,
        "beta": config.dpo_beta,
        "learning_rate": config.dpo_learning_rate,
        "loss_history": watch.history,
    }


def _set_reference(model, config: TrainConfig, champion: AdapterRef | None) -> str:
    """Make DPO's reference the one the config asks for; returns what it is."""
    wanted = config.preference_reference
    if wanted == "sft":
        return "sft"  # TRL copied the adapter SFT left into "ref" and froze it
    if REFERENCE_ADAPTER in model.peft_config:
        model.delete_adapter(REFERENCE_ADAPTER)
    if wanted == "champion" and champion is not None:
        model.load_adapter(str(champion.path), adapter_name=REFERENCE_ADAPTER, is_trainable=False)
        set_scale(model, REFERENCE_ADAPTER, champion.scale)
        model.set_adapter("default")
        return f"champion (adapter {champion.id}, scale {champion.scale:g})"
    # Without a "ref" adapter TRL disables the adapter for the reference: the frozen base
    return "base" if wanted == "base" else "base (no champion yet)"
