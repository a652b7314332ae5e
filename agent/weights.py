"""How the serving engine holds the base model's weight matrices: as loaded (`float`), or at 8 or 4
bits (`int8`, `int4`), each with its own matrix product for the forward (agent/llama.py).
`WEIGHT_FORMATS` names them as `DRAFTLOOP_SERVING_WEIGHTS` does."""

import torch
import torch.nn.functional as F

SPLIT_BELOW = 64  # inputs of fewer rows (decode steps) use the row-split matrix product
# On a CPU with AVX-512, float32 inputs of fewer rows than LEFT_BELOW multiply with the weight's
# halves as the left operand instead (measured on 2 AVX-512 BF16 EPYC cores, the 30 layers'
# weights: 31 against 21 GB/s for 1 row, 31 against 15 for 2, 17-20 against 15 for 4, and no
# better from 6 rows on, nor in bfloat16). Not measured on an AVX2 CPU: there the right operand stays.
LEFT_BELOW = 5
LEFT_PRODUCT = torch.backends.cpu.get_cpu_capability() == "AVX512"


class _Weight:
    """A weight matrix [out, in] as it was loaded, and the same memory as two halves of its rows,
    transposed."""

    def __init__(self, weight: torch.Tensor):
        self.full = weight
        rows_split = weight.view(2, weight.shape[0] // 2, weight.shape[1])  # [2, out / 2, in]
        self.halves = rows_split.transpose(1, 2)
        self.left = rows_split if LEFT_PRODUCT and weight.dtype == torch.float32 else None
        self.nbytes = weight.numel() * weight.element_size()

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x @ weight^T. For a few rows, MKL's matrix-vector product runs on one thread and
        reaches about half the memory bandwidth (measured: 11 of 23-30 GB/s on 2 cores);
        multiplying the two halves of the weight's rows as a batch of two runs one half per
        thread (1.5x faster), with the weight as the right operand or, for the fewest rows on
        an AVX-512 CPU, the left (LEFT_BELOW)."""
        rows = x.shape[0]
        if rows >= SPLIT_BELOW:
            return F.linear(x, self.full)
        if self.left is not None and rows < LEFT_BELOW:
            halves = torch.bmm(self.left, x.t().expand(2, -1, -1))  # [2, out / 2, rows]
            return halves.view(1, -1) if rows == 1 else halves.permute(2, 0, 1).reshape(rows, -1)
        halves = torch.bmm(x.expand(2, rows, x.shape[1]), self.halves)  # [2, rows, out / 2]
        return halves.view(1, -1) if rows == 1 else halves.transpose(0, 1).reshape(rows, -1)

    def prefill(self, x: torch.Tensor) -> torch.Tensor:
        """x @ weight^T for a prefill's rows (a prompt's tokens)."""
        return F.linear(x, self.full)


# PyTorch's weight-only CPU kernels are vectorized for bfloat16 activations (measured on 2 AVX-512
# cores: with float32 ones, int8 decoded 11 tokens/s and int4 6, against 33 and 48 in bfloat16).
# The quantized weights take their input in bfloat16 and give their output in the model's dtype;
# the rest of the forward (norms, attention, LoRA) stays as it is.
KERNEL_DTYPE = torch.bfloat16


class _QuantizedWeight:
    """A weight matrix [out, in] held at fewer bits for decode steps (`matmul`, by the format's
    `_kernel`), and as loaded (`full`, the model's dtype) for prefills.

    A prefill is bound by arithmetic, not by reading weights, and the weight-only kernels unpack
    the weights for every product: on 2 AVX2 cores they prefilled 40, 240 and 480 tokens in int4
    1.3-1.9x slower than float32, while int4 decode steps were faster at every batch size up to
    16 rows (bench/results/formats-by-rows.json). So prefills multiply by the weights the
    quantized ones were made from, kept beside them: the loaded tensors themselves (the fused
    q/k/v and gate/up are copies, as in the float format), bfloat16 on a CPU with native bf16,
    the dtype its products are fastest in. Every prefill does, whatever its length, so a
    prompt's prefill is the same whether it is packed with others or alone."""

    def __init__(self, weight: torch.Tensor):
        self.full = weight

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return self._kernel(x.to(KERNEL_DTYPE)).to(x.dtype)

    def prefill(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.full.dtype), self.full).to(x.dtype)


class _Int8Weight(_QuantizedWeight):
    """Held at 8 bits: symmetric per output row, w = q * scale[row], multiplied by PyTorch's
    weight-only int8 kernel."""

    def __init__(self, weight: torch.Tensor):
        super().__init__(weight)
        weight = weight.float()
        scale = (weight.abs().amax(dim=1) / 127).clamp(min=1e-12)  # [out]
        self.q = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
        self.scale = scale.to(KERNEL_DTYPE)
        self.nbytes = self.q.numel() + self.scale.numel() * self.scale.element_size()

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x, self.q, self.scale)


INT4_GROUP = 32  # input columns per 4-bit scale and zero


class _Int4Weight(_QuantizedWeight):
    """Held at 4 bits: per group of INT4_GROUP inputs of a row, an asymmetric code
    w = (q - 8) * scale + zero, as PyTorch's weight-only int4 kernel reads it."""

    def __init__(self, weight: torch.Tensor):
        out, inputs = weight.shape
        if inputs % INT4_GROUP:
            raise ValueError(f"int4 serving weights need inputs in groups of {INT4_GROUP}, not {inputs}: use int8")
        super().__init__(weight)
        w = weight.float().view(out, inputs // INT4_GROUP, INT4_GROUP)
        low, high = w.amin(dim=-1), w.amax(dim=-1)  # [out, groups]
        scale = ((high - low) / 15).clamp(min=1e-12)
        q = torch.round((w - low[..., None]) / scale[..., None]).clamp(0, 15)  # w = q * scale + low
        zero = low + 8 * scale  # so that w = (q - 8) * scale + zero
        packed = q.view(out, inputs).to(torch.int32)
        self.q = torch.ops.aten._convert_weight_to_int4pack_for_cpu(packed, 1)
        self.scales_and_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(KERNEL_DTYPE)
        self.nbytes = out * inputs // 2 + self.scales_and_zeros.numel() * self.scales_and_zeros.element_size()

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.q, INT4_GROUP, self.scales_and_zeros)


Weight = _Weight | _Int8Weight | _Int4Weight
WEIGHT_FORMATS = {"float": _Weight, "int8": _Int8Weight, "int4": _Int4Weight}


def compute_dtype(model_dtype: torch.dtype, weights: str) -> torch.dtype:
    """The dtype the forward computes in (and adapters are held in): the model's, except that
    with quantized weights it is float32, which decoded faster than bfloat16 around the same
    kernels (measured on 2 AVX-512 BF16 cores, int4: 60-70 against 49 tokens/s)."""
    return model_dtype if weights == "float" else torch.float32
