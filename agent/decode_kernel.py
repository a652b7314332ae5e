"""Decode steps on the CPU by a small C kernel (decode_kernel.c, compiled on first use by
agent/native.py for the CPU it runs on; it needs AVX2 and FMA, and uses AVX-512 where the CPU
has it): the matrix products (float32 weights as they are, bfloat16 weights packed for AVX-512
BF16 dot products where the CPU has them, and weights held at 8 bits, packed for it), a layer's
attention with its RoPE and cache writes (agent/kv_cache.py), the residual
add with RMSNorm (agent/llama.py), and a whole step of a Llama in one call (`Step`). Where it
cannot be built, or for what it does not take, the callers keep PyTorch's ops.

A step's few rows read every weight once, so a product is bound by reading the weights. On 2
AVX2 cores the embedded model's products of one row took 29.2 ms in float32 (PyTorch's best,
30.0) and 10.9 in int8 (PyTorch's int8 kernel, 19.4; bench/results/decode-kernel.json). Row-major
int8 rows of 576 inputs are 9 cache lines, too short for the hardware prefetcher: the same
kernel read them at 9.7 GB/s against 21.2 packed (a scratch run), so int8 weights are packed:
outputs in groups of PACK rows, inputs in chunks of a vector's width, the group's chunks one
after another. On 2 AVX-512 Xeon cores a whole int8 step of one row took 4.3-4.7 ms in one call
against 6.3-6.5 by parts (scratch runs; BENCHMARKS.md has the benchmark's figures)."""

import ctypes
import functools
from pathlib import Path

import torch

from agent import native

SOURCE = Path(__file__).with_name("decode_kernel.c")
PACK = 4  # int8 output rows per group, as decode_kernel.c's PACK
BLOCK = 16  # output rows per task, as decode_kernel.c's BLOCK
BF16_BLOCK = 48  # bfloat16 outputs per task, as decode_kernel.c's BF16_BLOCK


def takes(weight: torch.Tensor) -> bool:
    """Whether the kernel can multiply by `weight` [out, in] here: float32 or int8, or bfloat16
    where the CPU has AVX-512 BF16 dot products (`bf16_product`); on the CPU, contiguous, outputs in
    whole blocks and inputs in whole vectors, the kernel built."""
    out, inputs = weight.shape
    return (
        weight.device.type == "cpu"
        and weight.dtype in (torch.float32, torch.int8, torch.bfloat16)
        and weight.is_contiguous()
        and out % BLOCK == 0
        and load() is not None
        and inputs % load().vector_width() == 0
        and (weight.dtype != torch.bfloat16 or load().bf16_products() == 1)
    )


def pack(q: torch.Tensor) -> torch.Tensor:
    """int8 q [out, in] as the kernel reads it: [out / PACK, in / width, PACK, width], width the
    kernel's vectors' (8 float32, 16 with AVX-512)."""
    out, inputs = q.shape
    width = load().vector_width()
    return q.view(out // PACK, PACK, inputs // width, width).transpose(1, 2).contiguous()


def pack_bf16(weight: torch.Tensor) -> torch.Tensor:
    """bfloat16 weight [out, in] as the kernel's bfloat16 products read it (decode_kernel.c's
    `bf16_block`), one dimension: the outputs in blocks of BF16_BLOCK (the last one the rest), each
    block [in / 2, its outputs, 2], a pair of inputs of an output side by side."""
    out, inputs = weight.shape
    blocks = [weight[o : o + BF16_BLOCK] for o in range(0, out, BF16_BLOCK)]
    return torch.cat([b.view(b.shape[0], inputs // 2, 2).transpose(0, 1).reshape(-1) for b in blocks])


def bf16_product(x: torch.Tensor, packed: torch.Tensor, out: int) -> torch.Tensor:
    """x [rows, in] bfloat16 @ the bfloat16 weight [out, in] `packed` by `pack_bf16` -> [rows, out]
    float32, the sums float32."""
    x = x.contiguous()
    y = x.new_empty(x.shape[0], out, dtype=torch.float32)
    load().bf16_product(
        x.data_ptr(), x.shape[0], x.shape[1], packed.data_ptr(), y.data_ptr(), out, torch.get_num_threads()
    )
    return y


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
    if qkv.dtype != torch.float32:  # the kernel reads and writes float32: anything else overruns
        raise ValueError(f"the attention kernel takes float32 rows, not {qkv.dtype}")
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


class CacheAttention:
    """A decode step's attention by the kernel over a KV cache's layers (agent/kv_cache.py): called
    once per layer (an `Attend`) by a step computed by parts, and read whole by `Step`. k, v: each
    layer's [slots, kv_heads, max_length, head_dim] float32, and their addresses as the whole step
    reads them (`pointers`); positions [rows] int64, row b's of slot b."""

    def __init__(self, k, v, pointers, cos, sin, positions: torch.Tensor, heads: int):
        self.k, self.v, self.pointers, self.cos, self.sin, self.heads = k, v, pointers, cos, sin, heads
        self.positions = positions.contiguous()

    def __call__(self, layer: int, qkv: torch.Tensor) -> torch.Tensor:
        """qkv [rows, ...] in the model's dtype (bfloat16 too) -> the attended values in the same."""
        attended = attention(qkv.float(), self.positions, self.heads, self.cos, self.sin, self.k[layer], self.v[layer])
        return attended.to(qkv.dtype)


def cache_pointers(layers: list[torch.Tensor]):
    """The addresses of a KV cache's layers (keys or values) as `decode_step` reads them."""
    return (ctypes.c_void_p * len(layers))(*(t.data_ptr() for t in layers))


class _Weight(ctypes.Structure):  # decode_kernel.c's weight_t
    _fields_ = [("w", ctypes.c_void_p), ("scale", ctypes.c_void_p)]
    _fields_ += [(name, ctypes.c_int64) for name in ("out", "in_", "bf16")]


class _Layer(ctypes.Structure):  # layer_t
    _fields_ = [(name, _Weight) for name in ("qkv", "o", "gate_up", "down")]
    _fields_ += [(name, ctypes.c_void_p) for name in ("input_norm", "post_attention_norm", "next_norm")]


class _Model(ctypes.Structure):  # model_t
    _fields_ = [(name, ctypes.c_int64) for name in ("layers", "hidden", "intermediate", "heads", "kv_heads")]
    _fields_ += [("head_dim", ctypes.c_int64)]
    _fields_ += [("eps", ctypes.c_float), ("layer", ctypes.POINTER(_Layer)), ("lm_head", _Weight)]


class Step:
    """A whole decode step of a Llama (agent/llama.py) by the kernel, in one call: every layer
    (products, LoRA updates, attention, adds and norms) and the LM head. `of` describes the
    model's weights once; `run` takes a step's rows. A step by parts makes about 400 calls from
    Python, each product and the LoRA updates a parallel region of its own."""

    def __init__(self, model: _Model, keep: list):
        self.model, self.keep = model, keep  # keep: the tensors whose addresses the model holds

    @classmethod
    def of(cls, llama) -> "Step | None":
        """The kernel's description of `llama`'s weights, or None where it does not take them all
        (float32, bfloat16 or int8, packed for it where it packs them; the kernel built). The
        step's rows are float32 whatever the model's dtype: a bfloat16 model's norms are read in
        float32 copies, and its products round their rows to bfloat16."""
        if llama.dtype not in (torch.float32, torch.bfloat16) or llama.device.type != "cpu" or load() is None:
            return None
        operands = {id(w): w.kernel_operands() for w in llama.step_weights}
        if any(o is None for o in operands.values()) or llama.intermediate % 8:
            return None
        keep = [t for pair in operands.values() for t in pair if t is not None]

        def weight(w) -> _Weight:
            matrix, scale = operands[id(w)]
            out, inputs = w.full.shape
            scale_at = None if scale is None else scale.data_ptr()
            return _Weight(matrix.data_ptr(), scale_at, out, inputs, int(matrix.dtype == torch.bfloat16))

        layers = (_Layer * llama.num_layers)()
        after = [layer.input_norm for layer in llama.layers[1:]] + [llama.final_norm]
        for i, (layer, next_norm) in enumerate(zip(llama.layers, after, strict=True)):
            norms = tuple(n.float() for n in (layer.input_norm, layer.post_attention_norm, next_norm))
            keep += norms
            layers[i] = _Layer(*(weight(w) for w in (layer.qkv, layer.o, layer.gate_up, layer.down)))
            layers[i].input_norm, layers[i].post_attention_norm, layers[i].next_norm = (n.data_ptr() for n in norms)
        dims = (llama.num_layers, llama.embed.shape[1], llama.intermediate, llama.num_heads, llama.num_kv_heads)
        model = _Model(*dims, llama.head_dim, llama.eps, layers, weight(llama.lm_head))
        keep.append(layers)
        return cls(model, keep)

    def run(self, x: torch.Tensor, attend: CacheAttention, lora) -> torch.Tensor:
        """The step of x [rows, hidden] (its tokens' embeddings, float32: overwritten), rows at
        attend's positions, each row with its own adapter's update by `lora` (None, or
        (groups, order, starts): the adapters' kernel_step). Returns the logits [rows, vocab],
        float32."""
        rows = x.shape[0]
        logits = x.new_empty(rows, self.model.lm_head.out)
        groups, order, starts = lora if lora is not None else (None, None, None)
        k, v = attend.pointers
        load().decode_step(
            ctypes.byref(self.model),
            x.data_ptr(),
            rows,
            attend.positions.data_ptr(),
            k,
            v,
            attend.cos.data_ptr(),
            attend.sin.data_ptr(),
            attend.k[0].shape[2],
            groups,
            0 if starts is None else starts.shape[0] - 1,
            None if order is None else order.data_ptr(),
            None if starts is None else starts.data_ptr(),
            logits.data_ptr(),
            torch.get_num_threads(),
        )
        return logits


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
    built.bf16_product.argtypes = [pointer, size, size, pointer, pointer, size, ctypes.c_int]
    built.attention.argtypes = [pointer, pointer, size, size, size, size, pointer, pointer, pointer, pointer, size]
    built.attention.argtypes += [pointer, ctypes.c_int]
    built.add_rms_norm.argtypes = [pointer, pointer, pointer, ctypes.c_float, pointer, size, size]
    built.vector_width.restype = ctypes.c_int64
    built.decode_step.argtypes = [pointer, pointer, size, pointer, pointer, pointer, pointer, pointer, size, pointer]
    built.decode_step.argtypes += [size, pointer, pointer, pointer, ctypes.c_int]
    functions = (built.f32_product, built.int8_product, built.bf16_product, built.attention, built.add_rms_norm)
    for function in (*functions, built.decode_step):
        function.restype = None
    return built
