"""QLoRA training of one adapter with TRL's SFTTrainer on PEFT LoRA over a 4-bit NF4 base.

Completion-only loss: rows are in the conversational prompt/completion format, so the labels
are the reply plus the end-of-turn token, and the model learns to stop.

Chosen by validation, never by the held-out set (which train_adapter never sees): a slice of
the train rows is set aside; each learning rate tried trains the first steps of its schedule and
the one with the lowest validation NLL trains in full; the adapter kept is the epoch with the
lowest validation NLL, and training stops once an epoch makes it worse; last, the kept adapter's
validation NLL is scored at each scale of SCALES (its strength, applied at serving time) and
the best is the scale it is served at. With preference training, DPO follows SFT (or replaces
it) on the pairs of the fit rows (training/preference.py), and the scale is chosen after it.
"""

import hashlib
import json
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback

from agent.adapters import AdapterRef
from agent.base_model import nf4_quantization_config, resolve_dtype
from core.errors import Invalid
from training import preference, qlora
from training.config import TrainConfig
from training.qlora import Progress, Training


@dataclass
class TrainResult:
    steps: int
    seconds: float
    trained_tokens: int  # prompt + completion tokens of every step (padding not counted)
    reply_tokens: int  # of which completion tokens: the only ones through the LM head
    loss_history: list[dict] = field(default_factory=list)  # [{"step", "loss", "epoch"}] of the kept run
    selection: dict = field(default_factory=dict)  # what validation tried and chose


PROBE_BUDGET = 0.5  # the learning rates tried share this fraction of one run's steps
MIN_VALIDATION_ROWS = 8  # fewer train rows than this on either side: no validation slice
MIN_PAIRS = 4  # fewer preference pairs than this: no preference training
SCALES = (0.5, 0.75, 1.0, 1.25, 1.5)  # the adapter strengths scored on the validation slice


def split_validation(rows: list[dict], fraction: float) -> tuple[list[dict], list[dict]]:
    """The train rows as (fit, validation), by a hash of each row's content: the same rows always
    land on the same side, whatever else the split holds."""

    def bucket(row: dict) -> float:
        digest = hashlib.sha256(json.dumps(row, sort_keys=True).encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64

    validation = [row for row in rows if bucket(row) < fraction]
    if len(validation) < MIN_VALIDATION_ROWS or len(rows) - len(validation) < MIN_VALIDATION_ROWS:
        return rows, []
    return [row for row in rows if bucket(row) >= fraction], validation


def load_training_base(source: str, config: TrainConfig) -> PreTrainedModel:
    """The base model for training: 4-bit NF4 (QLoRA) by default, plain weights for LoRA.

    The NF4 weights are always bitsandbytes' own quantization of the base; `nf4_weights` only
    decides whether they are dequantized once or on every step (training/qlora.py)."""
    dtype = resolve_dtype(config.compute_dtype)
    kwargs: dict = {"dtype": dtype, "local_files_only": True}
    if config.quantization == "nf4":
        kwargs["quantization_config"] = nf4_quantization_config(dtype)
        if torch.cuda.is_available():
            kwargs["device_map"] = {"": 0}
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    if config.quantization == "nf4":
        qlora.keep_cpu_nf4_exact(model)
        if _nf4_path(model, config) == "dequantized":
            qlora.dequantize_once(model, dtype)
    return model


def _nf4_path(model: PreTrainedModel, config: TrainConfig) -> str:
    if config.nf4_weights != "auto":
        return config.nf4_weights
    fits = qlora.dequantized_bytes(model, resolve_dtype(config.compute_dtype)) <= qlora.free_memory_bytes() / 2
    return "dequantized" if fits else "bitsandbytes"


def _completion_only_trainer():
    """TRL's SFTTrainer with a leaner loss, defined on first use (TRL is a heavy import).

    The stock loss computes float32 log-probabilities over every position, prompt included, to
    log entropy and accuracy; with SmolLM2's 49k-token vocabulary that was about 40% of each CPU
    step (measured with py-spy). Here the LM head runs only on the completion positions, in the
    compute dtype, and the loss is the same token-mean cross-entropy over completion tokens."""
    from peft import PeftModel
    from trl import SFTTrainer

    class CompletionOnlySFTTrainer(SFTTrainer):
        trained_tokens = reply_tokens = 0

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            causal = model.get_base_model() if isinstance(model, PeftModel) else model
            attention_mask = inputs.get("attention_mask")
            self.trained_tokens += (
                int(attention_mask.sum()) if attention_mask is not None else inputs["input_ids"].numel()
            )
            if attention_mask is not None and bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all()):
                # Right padding only: causal attention alone never lets a real token see a pad,
                # and without a mask SDPA skips the half above the diagonal.
                attention_mask = None
            with self.accelerator.autocast():
                hidden = causal.get_decoder()(
                    input_ids=inputs["input_ids"],
                    attention_mask=attention_mask,
                    position_ids=inputs.get("position_ids"),
                    use_cache=False,
                ).last_hidden_state
                targets = inputs["labels"][:, 1:]
                mask = targets != -100
                logits = causal.get_output_embeddings()(hidden[:, :-1][mask])
            self.reply_tokens += int(mask.sum())
            loss = torch.nn.functional.cross_entropy(logits.float(), targets[mask], reduction="sum")
            loss = loss / mask.sum().clamp(min=1)
            return (loss, None) if return_outputs else loss

    return CompletionOnlySFTTrainer


class _Watch(TrainerCallback):
    """Reports progress, scores the validation slice at each epoch's end (and at a probe's last
    step), keeps the LoRA weights of the best epoch, and stops when an epoch made it worse."""

    def __init__(self, training: Training, offset: int, validation: list[dict], stop_after: int | None):
        self.training, self.offset, self.validation, self.stop_after = training, offset, validation, stop_after
        self.history: list[dict] = []
        self.scores: list[dict] = []  # [{"step", "epoch", "validation_nll"}]
        self.best: dict[str, torch.Tensor] | None = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.history.append({"step": state.global_step, "loss": round(logs["loss"], 4), "epoch": logs.get("epoch")})
            self.training.progress(self.offset + state.global_step, self.training.total_steps, logs["loss"])

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.stop_after is not None and state.global_step >= self.stop_after:
            self._score(state, model)
            control.should_training_stop = True

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        if self.stop_after is None and self._score(state, model):
            control.should_training_stop = True

    def _score(self, state, model) -> bool:
        """Score the validation slice; True when it is worse than the best epoch so far."""
        if not self.validation:
            return False
        model.eval()
        nll = _mean_nll(model, self.training.tokenizer, self.validation)
        model.train()
        best = min((s["validation_nll"] for s in self.scores), default=math.inf)
        self.scores.append(
            {"step": state.global_step, "epoch": round(state.epoch or 0, 2), "validation_nll": round(nll, 4)}
        )
        if nll < best:
            self.best = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        return nll >= best

    def restore_best(self, model) -> None:
        if self.best is not None:
            with torch.no_grad():
                for name, parameter in model.named_parameters():
                    if name in self.best:
                        parameter.copy_(self.best[name])


def train_adapter(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: list[dict],
    config: TrainConfig,
    out_dir: Path,
    progress: Progress = lambda step, total, loss: None,
    pairs: list[dict] = (),
    champion: AdapterRef | None = None,
) -> TrainResult:
    """Train a LoRA adapter on prompt/completion rows and save it (PEFT format) to out_dir. The
    learning rate and the epoch kept are chosen on a validation slice of these rows. With
    config.preference, DPO on the preference pairs follows SFT or replaces it (training/preference.py;
    `champion` is its reference when config.preference_reference asks for it)."""
    if not rows:
        raise Invalid("the training set is empty: there are no usable train-split corrections yet")
    fit, validation = split_validation(rows, config.validation_fraction)
    held = {json.dumps(row, sort_keys=True) for row in validation}
    fit_pairs = [p for p in pairs if json.dumps(preference.sft_row(p), sort_keys=True) not in held]
    held_pairs, pairs = len(pairs) - len(fit_pairs), fit_pairs
    with_pairs = config.preference != "none" and len(pairs) >= MIN_PAIRS
    if config.preference == "alone" and not with_pairs:
        raise Invalid(
            f"preference training alone needs at least {MIN_PAIRS} preference pairs outside the validation slice, "
            f"and there are {len(pairs)}: reviewers' edits of real drafts make them"
        )
    sft = config.preference != "alone"
    rates = [config.learning_rate, *config.try_learning_rates] if validation and sft else [config.learning_rate]
    steps = math.ceil(len(fit) / config.batch_size) * math.ceil(config.epochs) if sft else 0
    probe_steps = max(1, int(steps * PROBE_BUDGET / len(rates))) if len(rates) > 1 else 0
    sft_total = probe_steps * len(rates) + steps
    total = sft_total + (preference.dpo_steps(len(pairs), config) if with_pairs else 0)
    progress(0, total, None)
    training = Training(tokenizer, config, progress, total)
    started, tried, selection = time.perf_counter(), [], {}
    for index, rate in enumerate(rates if probe_steps else []):
        watch = _Watch(training, index * probe_steps, validation, stop_after=probe_steps)
        trainer = _fit(model, fit, rate, watch)
        tried.append(
            {"learning_rate": rate, "steps": probe_steps, "validation_nll": watch.scores[-1]["validation_nll"]}
        )
        trainer.model.unload()  # the base model without this probe's LoRA layers
    history, kept, done = [], None, 0
    if sft:
        rate = min(tried, key=lambda t: t["validation_nll"])["learning_rate"] if tried else config.learning_rate
        watch = _Watch(training, probe_steps * len(rates), validation, stop_after=None)
        trainer = _fit(model, fit, rate, watch)
        watch.restore_best(trainer.model)
        model, history, done = trainer.model, watch.history, probe_steps * len(rates) + trainer.state.global_step
        kept = min(watch.scores, key=lambda s: s["validation_nll"]) if watch.scores else None
        selection = {"learning_rates_tried": tried, "learning_rate": rate, "epochs_scored": watch.scores}
    if config.preference != "none":
        selection["preference"] = {"stage": config.preference, "pairs": len(pairs), "validation_pairs": held_pairs}
    if with_pairs:
        model, dpo = preference.train_preferences(model, pairs, champion, training, offset=sft_total)
        history, done = history + dpo.pop("loss_history"), sft_total + dpo["steps"]
        selection["preference"] |= dpo
        if validation:
            model.eval()
            kept = {"stage": "dpo", "validation_nll": round(_mean_nll(model, tokenizer, validation), 4)}
        selection["preference"]["validation_nll"] = kept["validation_nll"] if kept else None
    elif config.preference != "none":
        selection["preference"]["skipped"] = f"fewer than {MIN_PAIRS} preference pairs"
    if done < total:  # stopped early: the progress shown ends where training did
        progress(done, done, None)
    model.save_pretrained(out_dir)
    scale_started = time.perf_counter()
    scales = _score_scales(model, tokenizer, validation, kept["validation_nll"]) if kept else []
    # The lowest NLL; on a tie, the scale nearest the trained one
    scale = min(scales, key=lambda s: (s["validation_nll"], abs(s["scale"] - 1)))["scale"] if scales else 1.0
    return TrainResult(
        steps=done,
        seconds=time.perf_counter() - started,
        trained_tokens=training.trained_tokens,
        reply_tokens=training.reply_tokens,
        loss_history=history,
        selection={
            "fit_rows": len(fit),
            "validation_rows": len(validation),
            **selection,
            "kept": kept,
            "scales_tried": scales,
            "scale": scale,
            "scale_seconds": round(time.perf_counter() - scale_started, 1),
        },
    )


def _mean_nll(model, tokenizer, rows: list[dict]) -> float:
    from training.evaluate import example_nll

    return sum(example_nll(model, tokenizer, rows)) / len(rows)


def _score_scales(model, tokenizer, validation: list[dict], kept_nll: float) -> list[dict]:
    """The kept adapter's validation NLL at each of SCALES, through PEFT's own scale (at 1 it is
    the kept epoch's score)."""
    from agent.adapters import set_scale

    def nll_at(scale: float) -> float:
        if scale == 1.0:
            return kept_nll
        set_scale(model, model.active_adapter, scale)
        return round(_mean_nll(model, tokenizer, validation), 4)

    model.eval()
    scores = [{"scale": scale, "validation_nll": nll_at(scale)} for scale in SCALES]
    set_scale(model, model.active_adapter, 1.0)
    return scores


def _fit(model, rows: list[dict], learning_rate: float, watch: _Watch):
    """One TRL run over rows at this learning rate, watched by `watch`; returns its trainer. The
    trained and reply tokens of every run add up in `watch.training`."""
    from datasets import Dataset
    from trl import SFTConfig

    training = watch.training
    config = training.config
    with tempfile.TemporaryDirectory(prefix="draftloop-train-") as scratch:
        args = SFTConfig(
            output_dir=scratch,
            num_train_epochs=config.epochs,
            per_device_train_batch_size=config.batch_size,
            learning_rate=learning_rate,
            completion_only_loss=True,
            train_sampling_strategy="group_by_length",  # less padding per batch
            **qlora.trainer_arguments(config),
        )
        trainer = _completion_only_trainer()(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=training.tokenizer,
            peft_config=qlora.fresh_lora(config),
            callbacks=[watch],
        )
        # Fresh LoRA weights: on either NF4 path they start from the bf16-rounded values TRL gives
        # a 4-bit model's, so the run is the same whichever path applies the base.
        qlora.train(trainer, config, round_through_bf16=config.quantization == "nf4")
    training.trained_tokens += trainer.trained_tokens
    training.reply_tokens += trainer.reply_tokens
    return trainer
