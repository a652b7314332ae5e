"""How the frozen NF4 base and the LoRA update are applied while training, measured on the CPU.

Two paths give the same numbers (tested in tests/training/test_qlora.py):

- bitsandbytes' own: every forward and backward dequantizes each 4-bit weight again, then
  multiplies (on 2 AVX2 cores, 7% fewer tokens/s than plain LoRA, and a higher peak RSS).
- dequantized once: the same NF4 weights, dequantized by bitsandbytes once per run into the
  compute dtype and kept as frozen plain linear layers. It costs the memory of the unquantized
  weights (538 MB in float32 for SmolLM2-135M), so "auto" takes it only when that fits in half
  of the free memory (a 7B base on a small GPU keeps the 4-bit path).

On plain linear layers in float32 the LoRA update is merged into the frozen weight for each
step (`MergedLoRA`): one matrix product per projection instead of three, and none of the
rank-16 products whose inner dimension of 16 MKL runs at a tenth of its speed. The gradients
are still the low-rank ones; the merged weight is never stored.

Every trainer of a run, SFT's (training/train.py) and DPO's (training/preference.py), is set up
here alike: the LoRA config (lora_config, fresh_lora), the training arguments, what they share
(Training) and the cast and MergedLoRA routing before it trains (train).
"""

import types
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from agent.base_model import resolve_dtype
from training.config import TrainConfig

Progress = Callable[[int, int, float | None], None]  # step, total steps, latest loss


@dataclass
class Training:
    """What every trainer of one adapter's training shares (SFT's probes and run, DPO's): the
    tokenizer, the config, where progress goes and the steps of all of them together, and the
    tokens the SFT trainers have trained so far."""

    tokenizer: PreTrainedTokenizerBase
    config: TrainConfig
    progress: Progress
    total_steps: int
    trained_tokens: int = 0  # prompt + completion tokens of every step (padding not counted)
    reply_tokens: int = 0  # of which completion tokens


def lora_config(config: TrainConfig):
    """The LoRA adapter a run trains, SFT's and DPO's alike."""
    from peft import LoraConfig

    return LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        use_rslora=config.use_rslora,
        target_modules=list(config.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def fresh_lora(config: TrainConfig):
    """lora_config for a trainer that wraps the bare base in a new adapter, its initialisation
    seeded (drawn when the trainer wraps the model)."""
    torch.manual_seed(config.seed)
    return lora_config(config)


def train(trainer, config: TrainConfig, *, round_through_bf16: bool) -> None:
    """Train a TRL trainer's model as every trainer of a run does: its trainable (LoRA) weights in
    the compute dtype, each LoRA layer over a float32 plain linear through MergedLoRA.

    TRL keeps a 4-bit model's LoRA weights in bf16, which on a CPU without native bf16 is several
    times slower. With `round_through_bf16` the weights start from TRL's bf16-rounded values on
    either NF4 path (the same run, whichever applies the base) before the cast."""
    compute_dtype = resolve_dtype(config.compute_dtype)
    for parameter in trainer.model.parameters():
        if parameter.requires_grad:
            start = parameter.data.to(torch.bfloat16) if round_through_bf16 else parameter.data
            parameter.data = start.to(compute_dtype)
    merge_lora_forward(trainer.model)
    trainer.train()


def trainer_arguments(config: TrainConfig) -> dict:
    """The TrainingArguments every trainer of a run shares (SFT's and DPO's): the schedule, the
    dtype, the device, and no checkpoints, reports or progress bars of their own."""
    return dict(
        lr_scheduler_type="cosine",
        warmup_steps=0.05,
        weight_decay=0.0,
        max_length=config.max_length,
        gradient_checkpointing=config.gradient_checkpointing,
        bf16=resolve_dtype(config.compute_dtype) == torch.bfloat16,
        use_cpu=not torch.cuda.is_available(),
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=config.seed,
        data_seed=config.seed,
        dataset_num_proc=None,
    )


def dequantize_once(model: PreTrainedModel, dtype: torch.dtype) -> None:
    """Replace every bitsandbytes 4-bit linear layer by a frozen nn.Linear holding exactly the
    weights bitsandbytes would dequantize on every forward."""
    import bitsandbytes as bnb

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, bnb.nn.Linear4bit):
                continue
            weight = bnb.functional.dequantize_4bit(child.weight.data, child.weight.quant_state).to(dtype)
            linear = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None, dtype=dtype)
            linear.weight = nn.Parameter(weight, requires_grad=False)
            if child.bias is not None:
                linear.bias = nn.Parameter(child.bias.data.to(dtype), requires_grad=False)
            setattr(parent, name, linear.to(weight.device))
    # The model is no longer a bitsandbytes model: trainers must not treat it as one.
    model.is_loaded_in_4bit = model.is_quantized = False
    model.hf_quantizer = None
    model.config.quantization_config = None


def dequantized_bytes(model: PreTrainedModel, dtype: torch.dtype) -> int:
    import bitsandbytes as bnb

    elements = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    return elements * torch.empty((), dtype=dtype).element_size()


def free_memory_bytes() -> int:
    if torch.cuda.is_available():
        return torch.cuda.mem_get_info()[0]
    import psutil

    return psutil.virtual_memory().available


def keep_cpu_nf4_exact(model: PreTrainedModel) -> None:
    """bitsandbytes repacks 4-bit weights for a bf16-only CPU kernel the first time a layer runs
    in eval mode without gradients on an AVX-512-BF16 CPU; the result then differs from the
    training path (forced on this project's AVX2 machine it is unrelated to it: relative error
    1.4; it is what made a QLoRA adapter score NLL 15.7 on the NF4 base against 2.2 on the float
    one). Turned off here, a 4-bit model scores in eval mode exactly as it trains."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


class MergedLoRA(torch.autograd.Function):
    """y = x (W + s B A)^T with W frozen; the gradients of A and B are the low-rank ones,
    exactly those of x W^T + s (x A^T) B^T."""

    @staticmethod
    def forward(ctx, x, weight, lora_a, lora_b, scaling):
        flat = x.reshape(-1, x.shape[-1])  # [tokens, in]
        merged = torch.addmm(weight, lora_b, lora_a, alpha=scaling)  # [out, in]
        ctx.save_for_backward(flat, weight, lora_a, lora_b)
        ctx.scaling, ctx.input_shape = scaling, x.shape
        return (flat @ merged.t()).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        flat, weight, lora_a, lora_b = ctx.saved_tensors
        scaling = ctx.scaling
        grad = grad.reshape(-1, grad.shape[-1])  # [tokens, out]
        merged = torch.addmm(weight, lora_b, lora_a, alpha=scaling)  # recomputed: cheap, and never stored
        grad_x = (grad @ merged).view(ctx.input_shape)
        grad_b = (grad.t() @ (flat @ lora_a.t())) * scaling  # [out, r]
        grad_a = ((grad @ lora_b).t() @ flat) * scaling  # [r, in]
        return grad_x, None, grad_a, grad_b, None


def _merged_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """A PEFT lora.Linear forward through MergedLoRA, where it is exact; PEFT's own otherwise."""
    base = self.get_base_layer()
    if self.disable_adapters or self.merged or len(self.active_adapters) != 1 or not torch.is_grad_enabled():
        return type(self).forward(self, x, *args, **kwargs)
    name = self.active_adapters[0]
    lora_a, lora_b = self.lora_A[name].weight, self.lora_B[name].weight
    return MergedLoRA.apply(x.to(base.weight.dtype), base.weight, lora_a, lora_b, self.scaling[name])


def merge_lora_forward(model: nn.Module) -> int:
    """Route each LoRA layer over a float32 nn.Linear without bias or dropout through MergedLoRA."""
    from peft.tuners.lora import Linear as LoraLinear

    patched = 0
    for module in model.modules():
        if not isinstance(module, LoraLinear):
            continue
        base = module.get_base_layer()
        dropouts = [d for d in module.lora_dropout.values() if not isinstance(d, nn.Identity)]
        plain = isinstance(base, nn.Linear) and base.bias is None and base.weight.dtype == torch.float32
        if plain and not dropouts:
            module.forward = types.MethodType(_merged_forward, module)
            patched += 1
    return patched
