"""The base model's forward pass, hand-written over its loaded weights, for the serving engine.

Decoding one token reads every weight of the model once, so on a CPU it is bound by memory
bandwidth. This forward stays close to that bound: q/k/v and gate/up are fused into one matmul
each, matrix-vector products are split across both threads (`_Weight.matmul`), and there is none of the
per-token framework overhead of `generate`. Each row of a batch adds its own LoRA adapter's
low-rank update (a `BatchLora`: agent/adapters.py); attention, and with it the KV
cache, is a function the caller passes in (agent/kv_cache.py).

Shapes: `rows` is batch * length, the tokens of one forward (a prompt's, or one per sequence in
a decode step); `hidden` the model's width; q/k/v are [batch, heads, length, head_dim].
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from agent.adapters import INPUT_GROUPS, BatchLora

# (layer, q, k, v) -> the attended values [batch, heads, length, head_dim]; it also stores k and v
Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

SPLIT_BELOW = 64  # inputs of fewer rows (decode steps) use the row-split matrix product


class _Weight:
    """A weight matrix [out, in] as it was loaded, and the same memory as two halves of its rows,
    transposed."""

    def __init__(self, weight: torch.Tensor):
        self.full = weight
        self.halves = weight.view(2, weight.shape[0] // 2, weight.shape[1]).transpose(1, 2)
        self.nbytes = weight.numel() * weight.element_size()

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x @ weight^T. For a few rows, MKL's matrix-vector product runs on one thread and
        reaches about half the memory bandwidth (measured: 11 of 23-30 GB/s on 2 cores);
        multiplying the two halves of the weight's rows as a batch of two runs one half per
        thread (1.5x faster)."""
        rows = x.shape[0]
        if rows >= SPLIT_BELOW:
            return F.linear(x, self.full)
        halves = torch.bmm(x.expand(2, rows, x.shape[1]), self.halves)  # [2, rows, out / 2]
        return halves.view(1, -1) if rows == 1 else halves.transpose(0, 1).reshape(rows, -1)


# PyTorch's weight-only CPU kernels are vectorized for bfloat16 activations (measured on 2 AVX-512
# cores: with float32 ones, int8 decoded 11 tokens/s and int4 6, against 33 and 48 in bfloat16).
# The quantized weights take their input in bfloat16 and give their output in the model's dtype;
# the rest of the forward (norms, attention, LoRA) stays as it is.
KERNEL_DTYPE = torch.bfloat16


class _Int8Weight:
    """A weight matrix [out, in] held at 8 bits: symmetric per output row, w = q * scale[row],
    multiplied by PyTorch's weight-only int8 kernel."""

    def __init__(self, weight: torch.Tensor):
        w = weight.float()
        scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)  # [out]
        self.q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
        self.scale = scale.to(KERNEL_DTYPE)
        self.nbytes = self.q.numel() + self.scale.numel() * self.scale.element_size()

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x.to(KERNEL_DTYPE), self.q, self.scale).to(x.dtype)


INT4_GROUP = 32  # input columns per 4-bit scale and zero


class _Int4Weight:
    """A weight matrix [out, in] held at 4 bits: per group of INT4_GROUP inputs of a row, an
    asymmetric code w = (q - 8) * scale + zero, as PyTorch's weight-only int4 kernel reads it."""

    def __init__(self, weight: torch.Tensor):
        out, inputs = weight.shape
        if inputs % INT4_GROUP:
            raise ValueError(f"int4 serving weights need inputs in groups of {INT4_GROUP}, not {inputs}: use int8")
        w = weight.float().view(out, inputs // INT4_GROUP, INT4_GROUP)
        low, high = w.amin(dim=-1), w.amax(dim=-1)  # [out, groups]
        scale = ((high - low) / 15).clamp(min=1e-12)
        q = torch.round((w - low[..., None]) / scale[..., None]).clamp(0, 15)  # w = q * scale + low
        zero = low + 8 * scale  # so that w = (q - 8) * scale + zero
        packed = q.view(out, inputs).to(torch.int32)
        self.q = torch.ops.aten._convert_weight_to_int4pack_for_cpu(packed, 1)
        self.scales_and_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(KERNEL_DTYPE)
        self.nbytes = out * inputs // 2 + self.scales_and_zeros.numel() * self.scales_and_zeros.element_size()

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(KERNEL_DTYPE), self.q, INT4_GROUP, self.scales_and_zeros)
        return out.to(x.dtype)


Weight = _Weight | _Int8Weight | _Int4Weight
WEIGHT_FORMATS = {"float": _Weight, "int8": _Int8Weight, "int4": _Int4Weight}


def compute_dtype(model_dtype: torch.dtype, weights: str) -> torch.dtype:
    """The dtype the forward computes in (and adapters are held in): the model's, except that
    with quantized weights it is float32, which decoded faster than bfloat16 around the same
    kernels (measured on 2 AVX-512 BF16 cores, int4: 60-70 against 49 tokens/s)."""
    return model_dtype if weights == "float" else torch.float32


def _rope(x, cos, sin):
    """Rotary position embedding of x [rows, heads, head_dim], with cos and sin [rows, 1, head_dim]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


@dataclass
class _LayerWeights:
    qkv: Weight  # [q + k + v out, hidden]
    o: Weight  # [hidden, q out]
    gate_up: Weight  # [2 * intermediate, hidden]
    down: Weight  # [hidden, intermediate]
    input_norm: torch.Tensor  # [hidden]
    post_attention_norm: torch.Tensor  # [hidden]


class Llama:
    """A Llama-architecture model's weights as the forward reads them (q/k/v and gate/up
    concatenated; the others shared with the Hugging Face model, not copied) and its forward
    pass for a prompt (`prefill`) and for one decode step of a batch (`decode`). RoPE covers
    positions below `max_length`."""

    def __init__(self, model: PreTrainedModel, max_length: int, weights: str = "float"):
        config = model.config
        if config.model_type != "llama" or getattr(config, "attention_bias", False) or config.mlp_bias:
            raise ValueError("the serving engine runs Llama-architecture models without biases")
        self.num_layers = config.num_hidden_layers
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.eps = config.rms_norm_eps
        self.dtype = compute_dtype(model.dtype, weights)
        self.device = model.device

        base = model.model
        self.embed = base.embed_tokens.weight.detach().to(self.dtype)  # [vocab, hidden]
        held = WEIGHT_FORMATS[weights]
        self.lm_head = held(model.lm_head.weight.detach())  # [vocab, hidden]
        self.vocab_size = model.lm_head.weight.shape[0]
        self.final_norm = base.norm.weight.detach().to(self.dtype)
        self.layers = []
        for layer in base.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append(
                _LayerWeights(
                    qkv=held(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).detach()),
                    o=held(attn.o_proj.weight.detach()),
                    gate_up=held(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach()),
                    down=held(mlp.down_proj.weight.detach()),
                    input_norm=layer.input_layernorm.weight.detach().to(self.dtype),
                    post_attention_norm=layer.post_attention_layernorm.weight.detach().to(self.dtype),
                )
            )
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.intermediate = config.intermediate_size
        self.out_sizes = {  # of each adaptable projection, for its slice of a fused output
            "q_proj": self.q_size,
            "k_proj": self.kv_size,
            "v_proj": self.kv_size,
            "o_proj": self.q_size,
            "gate_proj": self.intermediate,
            "up_proj": self.intermediate,
            "down_proj": config.hidden_size,
        }
        self.slices = {}  # per input group: (projection, offset, size) in its fused output
        for group, members in INPUT_GROUPS.items():
            offsets = [sum(self.out_sizes[p] for p in members[:i]) for i in range(len(members))]
            self.slices[group] = [(p, o, self.out_sizes[p]) for p, o in zip(members, offsets, strict=True)]
        # RoPE from the model's own rotary module, so positions match generate's exactly.
        positions = torch.arange(max_length, device=self.device)[None]
        probe = torch.zeros(1, device=self.device, dtype=self.dtype)
        cos, sin = base.rotary_emb(probe, positions)
        self.cos, self.sin = cos[0], sin[0]  # [max_length, head_dim]

    def prefill(
        self, tokens: torch.Tensor, lora: BatchLora | None, attend: Attend, every_position: bool = False
    ) -> torch.Tensor:
        """One prompt, `tokens` [length]; returns the logits after its last token [1, vocab]
        (after each of its tokens [length, vocab] with every_position, for scoring a text)."""
        n = tokens.shape[0]
        cos, sin = self.cos[:n, None], self.sin[:n, None]  # [length, 1, head_dim]
        hidden = self._forward(tokens, lora, cos, sin, attend, batch=1, length=n)  # [length, hidden]
        return self.logits(hidden if every_position else hidden[-1:])

    def decode(
        self, tokens: torch.Tensor, positions: torch.Tensor, lora: BatchLora | None, attend: Attend
    ) -> torch.Tensor:
        """One new token per sequence, `tokens` [batch] at `positions` [batch]; returns the
        logits after each [batch, vocab]."""
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]  # [batch, 1, head_dim]
        hidden = self._forward(tokens, lora, cos, sin, attend, batch=tokens.shape[0], length=1)  # [batch, hidden]
        return self.logits(hidden)

    def logits(self, hidden):
        """hidden [rows, hidden] -> logits [rows, vocab]."""
        return self.lm_head.matmul(self._norm(hidden, self.final_norm))

    def _forward(self, tokens, lora: BatchLora | None, cos, sin, attend: Attend, *, batch: int, length: int):
        """The decoder layers on `tokens` ([batch * length]); returns the final hidden states
        [batch * length, hidden]. `cos` and `sin` are per token ([batch * length, 1, head_dim])."""
        x = F.embedding(tokens, self.embed)  # [rows, hidden]
        rows, heads = batch * length, self.num_heads + self.num_kv_heads
        for index, weights in enumerate(self.layers):
            h = self._norm(x, weights.input_norm)
            qkv = self._project(h, weights.qkv, lora, index, "attn_in")  # [rows, q_size + 2 * kv_size]
            # q and k rotated together: [rows, heads + kv_heads, head_dim]
            qk = _rope(qkv[:, : self.q_size + self.kv_size].view(rows, heads, self.head_dim), cos, sin)
            v = qkv[:, self.q_size + self.kv_size :].view(batch, length, self.num_kv_heads, self.head_dim)
            q, k = qk.view(batch, length, heads, self.head_dim).split([self.num_heads, self.num_kv_heads], dim=2)
            # q [batch, heads, length, head_dim]; k, v [batch, kv_heads, length, head_dim]
            attended = attend(index, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            attended = attended.transpose(1, 2).reshape(rows, self.q_size)  # [rows, q_size]
            x = x + self._project(attended, weights.o, lora, index, "attn_out")  # [rows, hidden]
            h = self._norm(x, weights.post_attention_norm)
            gate, up = self._project(h, weights.gate_up, lora, index, "mlp_in").split(self.intermediate, dim=-1)
            x = x + self._project(F.silu(gate) * up, weights.down, lora, index, "mlp_out")  # [rows, hidden]
        return x

    def _norm(self, x, weight):
        """RMSNorm as Llama computes it: in float32, scaled in the model's dtype."""
        if x.dtype == torch.float32:
            return F.rms_norm(x, weight.shape, weight, self.eps)  # one fused op, the same arithmetic
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * x32.to(x.dtype)

    def _project(self, x, weight: Weight, lora: BatchLora | None, layer: int, group: str):
        """x [rows, in] @ weight^T [in, out], plus each row's own LoRA update for the projections
        of this input group (each one's slice of the fused output)."""
        out = weight.matmul(x)
        if lora is not None:
            lora.add_to(out, x, layer, group, self.slices[group])
        return out
