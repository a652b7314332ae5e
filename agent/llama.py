"""The base model's forward pass, hand-written over its loaded weights, for the serving engine.

Decoding one token reads every weight of the model once, so on a CPU it is bound by memory
bandwidth. This forward stays close to that bound: q/k/v and gate/up are fused into one matmul
each, matrix-vector products are split across both threads (the weight formats:
agent/weights.py), and there is none of the per-token framework overhead of `generate`: on the
CPU a decode step's attention and its residual adds and norms are a C kernel's, one call each
(agent/decode_kernel.py). Each
row of a batch adds its own LoRA adapter's low-rank update (a `BatchLora`: agent/adapters.py);
attention, and with it the KV cache, is a function the caller passes in (agent/kv_cache.py).

Shapes: `rows` is batch * length, the tokens of one forward (several prompts' packed one after
another, or one per sequence in a decode step); `hidden` the model's width; q/k/v are [batch, heads, length, head_dim].
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from agent import decode_kernel
from agent.adapters import INPUT_GROUPS, BatchLora
from agent.weights import WEIGHT_FORMATS, Weight, choose_products, compute_dtype, hold_together

# (layer, qkv [rows, q + k + v out], as projected) -> the attended values [rows, q out]; it rotates q
# and k (RoPE at each row's position) and stores k and v
Attend = Callable[[int, torch.Tensor], torch.Tensor]


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
    pass for prompts (`prefill`) and for one decode step of a batch (`decode`). RoPE covers
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
        # every weight of a decode step, in the order it reads them
        self.step_weights = [w for layer in self.layers for w in (layer.qkv, layer.o, layer.gate_up, layer.down)]
        self.step_weights.append(self.lm_head)
        hold_together(self.step_weights)
        # the residual stream's adds and norms of decode steps by the C kernel (agent/decode_kernel.py)
        self.kernel_norms = decode_kernel.takes_rows(self.embed)
        # Decode steps' products, measured on these weights on a CPU (agent/weights.py)
        self.products = {}
        if weights == "float" and self.device.type == "cpu":
            self.products = choose_products(self.step_weights)
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
        # Whole decode steps by the C kernel, for as many rows as its products are chosen for
        self.step = decode_kernel.Step.of(self) if self.device.type == "cpu" else None
        self.step_rows = min(w.kernel_rows for w in self.step_weights) if self.step else 0

    def prefill(
        self, prompts: list[torch.Tensor], lora: BatchLora | None, attend: Attend, every_position: bool = False
    ) -> torch.Tensor:
        """Prompts, each `tokens` [length], packed without padding into one forward of
        sum(lengths) rows (a batch of one), each prompt's positions counted from 0; `attend` keeps
        each prompt to its own rows. Returns the logits after each prompt's last token [prompts,
        vocab] (after every token [rows, vocab] with every_position, for scoring a text)."""
        lengths = [tokens.shape[0] for tokens in prompts]
        hidden = self._forward(torch.cat(prompts), lora, attend, prefill=True)
        if not every_position:
            hidden = hidden[torch.tensor(lengths, device=self.device).cumsum(0) - 1]  # [prompts, hidden]
        return self.logits(hidden, prefill=True)

    def decode(self, tokens: torch.Tensor, lora: BatchLora | None, attend: Attend) -> torch.Tensor:
        """One new token per sequence, `tokens` [batch]; returns the logits after each [batch, vocab].
        `attend` puts them at their positions.

        On a CPU where the C kernel takes the weights and the cache, the whole step is one call
        of it (decode_kernel.Step), for as many rows as its products were measured fastest for."""
        rows = tokens.shape[0]
        if isinstance(attend, decode_kernel.CacheAttention) and rows <= self.step_rows:
            step_lora = None if lora is None else lora.kernel_step(rows, self.slices, self.num_layers)
            return self.step.run(F.embedding(tokens, self.embed).float(), attend, step_lora)
        return self.logits(self._forward(tokens, lora, attend, prefill=False), prefill=False)

    def logits(self, hidden, prefill: bool):
        """hidden [rows, hidden], after the final norm -> logits [rows, vocab]."""
        return self._product(hidden, self.lm_head, prefill)

    def _forward(self, tokens, lora: BatchLora | None, attend: Attend, *, prefill: bool):
        """The decoder layers on `tokens` [rows]; returns the final hidden states after the final
        norm [rows, hidden]. `prefill`: a prefill's forward, not a decode step's (the weights'
        product for each, and the residual stream's adds and norms: by the C kernel in a decode
        step where it runs)."""
        by_kernel = self.kernel_norms and not prefill
        x, h = self._add_norm(F.embedding(tokens, self.embed), None, self.layers[0].input_norm, by_kernel)
        after = [weights.input_norm for weights in self.layers[1:]] + [self.final_norm]  # each layer's last norm
        for index, (weights, last_norm) in enumerate(zip(self.layers, after, strict=True)):
            qkv = self._project(h, weights.qkv, lora, index, "attn_in", prefill)  # [rows, q_size + 2 * kv_size]
            attended = attend(index, qkv)  # [rows, q_size]
            out = self._project(attended, weights.o, lora, index, "attn_out", prefill)  # [rows, hidden]
            x, h = self._add_norm(x, out, weights.post_attention_norm, by_kernel)
            gate, up = self._project(h, weights.gate_up, lora, index, "mlp_in", prefill).split(self.intermediate, -1)
            out = self._project(F.silu(gate) * up, weights.down, lora, index, "mlp_out", prefill)  # [rows, hidden]
            x, h = self._add_norm(x, out, last_norm, by_kernel)
        return h

    def _add_norm(self, x, out, weight, by_kernel: bool):
        """The residual stream x [rows, hidden] plus a layer's output (none when `out` is None), and
        its RMSNorm with `weight`: (x, normed). The C kernel adds in place, in one call with the
        norm: PyTorch's add and norm took about 45 us for one row (2 AVX2 cores)."""
        if by_kernel:
            return x, decode_kernel.add_rms_norm(x, out, weight, self.eps)
        if out is not None:
            x = x + out
        return x, self._norm(x, weight)

    def rope_at(self, positions):
        """cos and sin of RoPE at `positions` [rows], each [rows, 1, head_dim] (for `heads`)."""
        return self.cos[positions][:, None], self.sin[positions][:, None]

    def heads(self, qkv, cos, sin, batch: int, length: int):
        """A forward's qkv [batch * length, q_size + 2 * kv_size], with RoPE's cos and sin at its
        rows' positions (`rope_at`), as q [batch, heads, length, head_dim] and k, v [batch,
        kv_heads, length, head_dim], q and k rotated (for attention computed by PyTorch:
        agent/kv_cache.py)."""
        rows, heads = batch * length, self.num_heads + self.num_kv_heads
        # q and k rotated together: [rows, heads + kv_heads, head_dim]
        qk = _rope(qkv[:, : self.q_size + self.kv_size].view(rows, heads, self.head_dim), cos, sin)
        v = qkv[:, self.q_size + self.kv_size :].view(batch, length, self.num_kv_heads, self.head_dim)
        q, k = qk.view(batch, length, heads, self.head_dim).split([self.num_heads, self.num_kv_heads], dim=2)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def _norm(self, x, weight):
        """RMSNorm as Llama computes it: in float32, scaled in the model's dtype."""
        if x.dtype == torch.float32:
            return F.rms_norm(x, weight.shape, weight, self.eps)  # one fused op, the same arithmetic
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * x32.to(x.dtype)

    @staticmethod
    def _product(x, weight: Weight, prefill: bool):
        """x [rows, in] @ weight^T [in, out], by the weight format's product for prefills or for
        decode steps."""
        return weight.prefill(x) if prefill else weight.matmul(x)

    def _project(self, x, weight: Weight, lora: BatchLora | None, layer: int, group: str, prefill: bool):
        """x [rows, in] @ weight^T [in, out], plus each row's own LoRA update for the projections
        of this input group (each one's slice of the fused output)."""
        out = self._product(x, weight, prefill)
        if lora is not None:
            lora.add_to(out, x, layer, group, self.slices[group])
        return out
