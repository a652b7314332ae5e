"""The serving engine's KV cache: keys and values of every sequence in the batch, preallocated.

Sequence i of the batch lives in slot i, and the slots in use stay contiguous (`move`), so a
decode step attends over the first `batch` slots as one tensor. The cache hands the forward
pass (agent/llama.py) its attention: one function per forward, called once per layer, that
writes the layer's new keys and values into their positions and attends over the cached ones.
"""

import torch
import torch.nn.functional as F

from agent import decode_kernel
from agent.llama import Attend, Llama

# Keys, values and the attention over them are float32 whatever the model's dtype: PyTorch's CPU
# attention for one new token over a 260-token cache took 190 us per layer in bfloat16 against
# 36 us in float32 (2.5 ms against 0.35 ms for a batch of 16; measured on 2 AVX-512 BF16 cores),
# so a bfloat16 model decoded slower than a float32 one. The memory is twice bfloat16's.
CACHE_DTYPE = torch.float32


class KVCache:
    """Per layer of the model, keys and values [max_batch, kv_heads, max_length, head_dim]."""

    def __init__(self, model: Llama, max_batch: int, max_length: int):
        self.model, self.device = model, model.device
        shape = (max_batch, model.num_kv_heads, max_length, model.head_dim)
        self.k = [torch.zeros(shape, dtype=CACHE_DTYPE, device=self.device) for _ in range(model.num_layers)]
        self.v = [torch.zeros(shape, dtype=CACHE_DTYPE, device=self.device) for _ in range(model.num_layers)]
        self.cos, self.sin = (table.to(CACHE_DTYPE).contiguous() for table in (model.cos, model.sin))  # RoPE
        self._pointers = tuple(decode_kernel.cache_pointers(layers) for layers in (self.k, self.v))

    def prefill_attention(self, slots: list[int], lengths: list[int]) -> Attend:
        """Attention for prompts packed into one forward (a batch of one, sum(lengths) long):
        prompt i's keys and values fill positions [0, lengths[i]) of slot slots[i], and each of
        its tokens attends to those before it in the same prompt.

        One causal attention per prompt on its own slice of the rows, not one attention over the
        pack with a block-diagonal mask: a masked attention computes every pair of the pack's
        rows. For 8 sample emails' prompts (1586 rows) one layer took 7.5 ms against 50.8 masked,
        for 8 short ones (371 rows) 1.6 against 3.9 (2 AVX2 cores; bench/results/prefill.json)."""
        k_cache, v_cache, model = self.k, self.v, self.model
        positions = torch.cat([torch.arange(n, device=self.device) for n in lengths])
        rows, (cos, sin) = positions.shape[0], model.rope_at(positions)

        def attend(layer: int, qkv):
            q, k, v = model.heads(qkv, cos, sin, 1, rows)  # q [1, heads, rows, head_dim]; k, v [1, kv_heads, ...]
            attended = []
            for slot, length, q_i, k_i, v_i in zip(
                slots, lengths, *(t.to(CACHE_DTYPE).split(lengths, dim=2) for t in (q, k, v)), strict=True
            ):
                k_cache[layer][slot, :, :length] = k_i[0]
                v_cache[layer][slot, :, :length] = v_i[0]
                attended.append(F.scaled_dot_product_attention(q_i, k_i, v_i, is_causal=True, enable_gqa=True))
            return torch.cat(attended, dim=2).to(q.dtype).transpose(1, 2).reshape(rows, model.q_size)

        return attend

    def decode_attention(self, positions: torch.Tensor, span: int) -> Attend:
        """Attention for one decode step of the sequences in slots [0, batch): each one's new key
        and value go to its own position (`positions` [batch]), and it attends to the cache up to
        there; `span` is the longest sequence's length after the step.

        On a CPU where the C kernel builds, one call per layer does it all (RoPE, the cache
        writes, the attention; agent/decode_kernel.py), and a whole decode step by the kernel reads
        the cache from what it returns: PyTorch's ops for it took about 90 us a layer for one row,
        and its attention 460 us for 16 rows (2 AVX2 cores)."""
        model, batch = self.model, positions.shape[0]
        k_cache, v_cache = self.k, self.v
        if decode_kernel.takes_attention(self.k[0], model.head_dim):
            return decode_kernel.CacheAttention(
                self.k, self.v, self._pointers, self.cos, self.sin, positions, model.num_heads
            )

        visible = torch.arange(span, device=self.device)[None] <= positions[:, None]  # [batch, span]
        mask = visible[:, None, None, :]
        slots = torch.arange(batch, device=self.device)
        cos, sin = model.rope_at(positions)

        def attend(layer: int, qkv):
            # q [batch, heads, 1, head_dim]; k, v [batch, kv_heads, 1, head_dim]
            q, k, v = model.heads(qkv, cos, sin, batch, 1)
            layer_k, layer_v = k_cache[layer], v_cache[layer]
            layer_k[slots, :, positions] = k[:, :, 0].to(CACHE_DTYPE)
            layer_v[slots, :, positions] = v[:, :, 0].to(CACHE_DTYPE)
            keys, values = layer_k[:batch, :, :span], layer_v[:batch, :, :span]
            attended = F.scaled_dot_product_attention(q.to(CACHE_DTYPE), keys, values, attn_mask=mask, enable_gqa=True)
            return attended.to(q.dtype).reshape(batch, model.q_size)

        return attend

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of slot `src` into slot `dst`, in every layer."""
        for cache in (*self.k, *self.v):
            cache[dst, :, :length] = cache[src, :, :length]
