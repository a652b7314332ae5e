"""Decode steps on the CPU by a small C kernel (decode_kernel.c, compiled on first use by
agent/native.py for the CPU it runs on; it needs AVX2 and FMA): the matrix products (float32
weights as they are, and weights held at 8 bits, packed for it), a layer's attention with its
RoPE and cache writes (agent/kv_cache.py), and the residual add with RMSNorm (agent/llama.py).
Where it cannot be built, or for what it does not take, the callers keep PyTorch's ops.

A step's few rows read every weight once, so a product is bound by reading the weights. On 2
AVX2 cores the embedded model's products of one row took 29.2 ms in float32 (PyTorch's best,
30.0) and 10.9 in int8 (PyTorch's int8 kernel, 19.4; bench/results/decode-kernel.json). Row-major
int8 rows of 576 inputs are 9 cache lines, too short for the hardware prefetcher: the same
kernel read them at 9.7 GB/s against 21.2 packed (a scratch run), so int8 weights are packed:
outputs in groups of PACK rows, inputs in chunks of 8, the group's chunks one after another."""

import ctypes
import functools
from pathlib import Path

import torch

from agent import native

SOURCE = Path(__file__).with_name("decode_kernel.c")
PACK = 4  # int8 output rows per group, as decode_kernel.c's PACK
BLOCK = 16  # output rows per task, as decode_kernel.c's BLOCK


def takes(weight: torch.Tensor) -> bool:
    """Whether the kernel can multiply by `weight` [out, in] (float32 or int8) here: on the CPU,
    contiguous, outputs in whole blocks and inputs in whole vectors, the kernel built."""
    out, inputs = weight.shape
    return (
        weight.device.type == "cpu"
        and weight.dtype in (torch.float32, torch.int8)
        and weight.is_contiguous()
        and out % BLOCK == 0
        and inputs % 8 == 0
        and load() is not None
    )


def pack(q: torch.Tensor) -> torch.Tensor:
    """int8 q [out, in] as the kernel reads it: [out / PACK, in / 8, PACK, 8]."""
    out, inputs = q.shape
    return q.view(out // PACK, PACK, inputs // 8, 8).transpose(1, 2).contiguous()


def f32_product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [rows, in] @ weight [out, in]^T, both float32 -> [rows, out] float32."""
    x = x.contiguous()
    y = x.new_empty(x.shape[0], weight.shape[0])
    load().f32_product(
        x.data_ptr(), x.shape[0], x.shape[1], weight.data_ptr(), y.data_ptr(), weight.shape[0], torch.get_num_threads()
    )
    return y


def int8_product(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [rows, in] float32 @ (q * scale [out] float32)^T -> [rows, out] float32, q packed by `pack`."""
    x = x.contiguous()
    out = packed.shape[0] * PACK
    y = x.new_empty(x.shape[0], out)
    load().int8_product(
        x.data_ptr(),
        x.shape[0],
        x.shape[1],
        packed.data_ptr(),
        scale.data_ptr(),
        y.data_ptr(),
        out,
        torch.get_num_threads(),
    )
    return y


def takes_rows(x: torch.Tensor) -> bool:
    """Whether the kernel can take rows like `x` for the residual stream's adds and norms: float32 on
    the CPU, the kernel built."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and load() is not None


def takes_attention(cache: torch.Tensor, head_dim: int) -> bool:
    """Whether the kernel can run decode steps' attention over `cache` (a layer's keys or values
    [slots, kv_heads, max_length, head_dim]) here: float32 on the CPU, whole vectors of a head."""
    return cache.device.type == "cpu" and cache.dtype == torch.float32 and head_dim % 8 == 0 and load() is not None


def attention(qkv, positions, heads: int, cos, sin, k_cache, v_cache) -> torch.Tensor:
    """One decode step's attention in one layer (decode_kernel.c's `attention`): qkv [rows, (heads +
    2 * kv_heads) * head_dim] float32 as projected; row b's token at positions[b] (int64) of slot
    b; cos, sin [max_length, head_dim] float32; the layer's cache [slots, kv_heads, max_length,
    head_dim]. Returns the attended values [rows, heads * head_dim]."""
    qkv = qkv.contiguous()
    rows, (_, kv_heads, max_length, head_dim) = qkv.shape[0], k_cache.shape
    out = qkv.new_empty(rows, heads * head_dim)
    load().attention(
        qkv.data_ptr(),
        positions.data_ptr(),
        rows,
        heads,
        kv_heads,
        head_dim,
        cos.data_ptr(),
        sin.data_ptr(),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        max_length,
        out.data_ptr(),
        torch.get_num_threads(),
    )
    return out


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x += delta in place (float32 [rows, n], contiguous; none when delta is None), and returns
    RMSNorm(x) with `weight` [n] float32 (decode_kernel.c's `add_rms_norm`)."""
    h = torch.empty_like(x)
    delta_at = None if delta is None else delta.contiguous().data_ptr()
    load().add_rms_norm(x.data_ptr(), delta_at, weight.data_ptr(), eps, h.data_ptr(), x.shape[0], x.shape[1])
    return h


@functools.cache
def load() -> ctypes.CDLL | None:
    """The compiled kernel, or None where it cannot be built."""
    built = native.library(SOURCE)
    if built is None:
        return None
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    built.f32_product.argtypes = [pointer, size, size, pointer, pointer, size, ctypes.c_int]
    built.int8_product.argtypes = [pointer, size, size, pointer, pointer, pointer, size, ctypes.c_int]
    built.attention.argtypes = [pointer, pointer, size, size, size, size, pointer, pointer, pointer, pointer, size]
    built.attention.argtypes += [pointer, ctypes.c_int]
    built.add_rms_norm.argtypes = [pointer, pointer, pointer, ctypes.c_float, pointer, size, size]
    for function in (built.f32_product, built.int8_product, built.attention, built.add_rms_norm):
        function.restype = None
    return built
