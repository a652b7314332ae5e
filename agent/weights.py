"""How the serving engine holds the base model's weight matrices: as loaded (`float`), or at 8 or 4
bits (`int8`, `int4`), each with its own matrix product for the forward (agent/llama.py).
`WEIGHT_FORMATS` names them as `DRAFTLOOP_SERVING_WEIGHTS` does."""

import sys
import time

import torch
import torch.nn.functional as F

from agent import decode_kernel, native


def _linear(weight: "_Weight", x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, weight.full)


def _halves_right(weight: "_Weight", x: torch.Tensor) -> torch.Tensor:
    """The two halves of the weight's rows as a batch of two, x on the left: one half per thread."""
    rows = x.shape[0]
    halves = torch.bmm(x.expand(2, rows, x.shape[1]), weight.right)  # [2, rows, out / 2]
    return halves.view(1, -1) if rows == 1 else halves.transpose(0, 1).reshape(rows, -1)


def _halves_left(weight: "_Weight", x: torch.Tensor) -> torch.Tensor:
    """The same halves as the left operand, x^T on the right."""
    rows = x.shape[0]
    halves = torch.bmm(weight.left, x.t().expand(2, -1, -1))  # [2, out / 2, rows]
    # contiguous, as the others give it: the LoRA kernel and the ops after it read rows in place
    return halves.view(1, -1) if rows == 1 else halves.permute(2, 0, 1).contiguous().view(rows, -1)


def _kernel(weight: "_Weight", x: torch.Tensor) -> torch.Tensor:
    """The C kernel's product (agent/decode_kernel.py): float32 weights on a CPU where it builds,
    bfloat16 ones (packed for it) where the CPU has AVX-512 BF16."""
    if weight.packed is not None:
        return decode_kernel.bf16_product(x, weight.packed, weight.full.shape[0]).to(x.dtype)
    return decode_kernel.f32_product(x, weight.full)


# The matrix products a decode step can use, all giving x @ weight^T in the same layout.
PRODUCTS = {"linear": _linear, "halves_right": _halves_right, "halves_left": _halves_left, "kernel": _kernel}


def products_for(weight: torch.Tensor) -> dict:
    """The products of PRODUCTS that can multiply by `weight`: the kernel's only where it takes it."""
    return {name: product for name, product in PRODUCTS.items() if name != "kernel" or decode_kernel.takes(weight)}


TUNED_ROWS = (1, 2, 4, 8, 16, 32)  # row counts measured; more rows than the last use F.linear


class _Weight:
    """A weight matrix [out, in] as it was loaded, and the same memory as two halves of its rows
    (`left` [2, out / 2, in], and transposed, `right` [2, in, out / 2]).

    Which product a decode step's few rows are fastest with depends on the CPU and the dtype, by
    up to 2.7x, and the fastest on one machine was the slowest on another: MKL's float32
    matrix-vector product runs on one thread, and the halves run one per thread. Measured, the
    embedded model's 30 layers, ms per step for 1 / 16 rows (`halves_right`, `halves_left`,
    `linear`): on 2 AVX-512 BF16 EPYC cores in float32 the halves on the left were 1.5x the
    others at 1 row; on 2 Intel Xeon cores with AMX, in float32 at 1 row, the halves on the left
    took 36.1-36.8 ms and F.linear 15.7, and in bfloat16 at 16 rows 21.5 / 13.3 / 16.8. So
    `choose_products` measures them on the model's own weights when the engine loads on a CPU,
    and `by_rows` holds the choice for each row count (`TUNED_ROWS` and those between); without
    it (on a GPU), and from more rows on, F.linear."""

    def __init__(self, weight: torch.Tensor):
        self.full = weight
        self.left = weight.view(2, weight.shape[0] // 2, weight.shape[1])
        self.right = self.left.transpose(1, 2)
        self.nbytes = weight.numel() * weight.element_size()
        self.by_rows: tuple = ()  # product for each row count (index), set by choose_products
        # bfloat16 weights as the kernel's bfloat16 products read them, a copy beside `full` (which
        # prefills multiply by); None where the kernel does not take them
        bf16 = weight.dtype == torch.bfloat16 and decode_kernel.takes(weight)
        self.packed = decode_kernel.pack_bf16(weight) if bf16 else None

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x @ weight^T for a decode step's rows, by the product measured fastest for as many."""
        rows = x.shape[0]
        return (self.by_rows[rows] if rows < len(self.by_rows) else _linear)(self, x)

    def prefill(self, x: torch.Tensor) -> torch.Tensor:
        """x @ weight^T for a prefill's rows (a prompt's tokens)."""
        return F.linear(x, self.full)

    @property
    def kernel_rows(self) -> int:
        """Up to how many rows a decode step's products are the C kernel's (by_rows)."""
        by_kernel = [product is _kernel for product in self.by_rows[1:]] + [False]
        return by_kernel.index(False)

    def kernel_operands(self) -> tuple[torch.Tensor, None] | None:
        """The weights as a whole decode step by the C kernel reads them (decode_kernel.Step): the
        float32 matrix, or the bfloat16 one packed, and no scale; None where the kernel does not
        take them."""
        if not decode_kernel.takes(self.full):
            return None
        return (self.full if self.packed is None else self.packed), None


_chosen: dict[tuple, dict[tuple, dict[int, str]]] = {}  # the measured choices, per model shape and dtype


def choose_products(weights: list["_Weight"], repeats: int = 3) -> dict[str, dict[int, str]]:
    """Time every product of PRODUCTS on `weights` (a decode step's, each read once per pass, so
    that they come from memory as in a step) for each of TUNED_ROWS rows, alternated, the best of
    `repeats` passes each; give every weight the fastest for each row count (a count between two
    measured ones takes the larger's). Weights of one shape are timed together, as a group, and
    each shape gets its own choice. Measured once per process for a model's shapes and dtype.
    Returns {shape: {rows: product name}}."""
    shapes: dict[tuple, list[_Weight]] = {}
    for weight in weights:
        shapes.setdefault(tuple(weight.full.shape), []).append(weight)
    first = weights[0].full
    layout = tuple(sorted((shape, len(group)) for shape, group in shapes.items()))
    key = (first.dtype, first.device.type, torch.get_num_threads(), layout, tuple(products_for(first)))
    if key not in _chosen:
        _chosen[key] = {shape: _measure(group, repeats) for shape, group in shapes.items()}
    for shape, group in shapes.items():
        choice = _chosen[key][shape]
        by_rows = [_linear]
        for rows in range(1, TUNED_ROWS[-1] + 1):
            by_rows.append(PRODUCTS[choice[next(r for r in TUNED_ROWS if r >= rows)]])
        for weight in group:
            weight.by_rows = tuple(by_rows)
    return {f"{out}x{inputs}": choice for (out, inputs), choice in _chosen[key].items()}


@torch.inference_mode()
def _measure(group: list["_Weight"], repeats: int) -> dict[int, str]:
    choice, candidates = {}, products_for(group[0].full)
    for rows in TUNED_ROWS:
        x = group[0].full.new_full((rows, group[0].full.shape[1]), 0.01)
        best = dict.fromkeys(candidates, float("inf"))
        for _ in range(repeats + 1):  # the first pass is a warm-up
            for name, product in candidates.items():
                started = time.perf_counter()
                for weight in group:
                    product(weight, x)
                best[name] = min(best[name], time.perf_counter() - started)
        choice[rows] = min(best, key=best.get)
    return choice


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

    def kernel_operands(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """None: the C kernel takes only int8 weights packed for it (_Int8Weight's)."""
        return None

    kernel_rows = 0  # rows whose products are the C kernel's


class _Int8Weight(_QuantizedWeight):
    """Held at 8 bits: symmetric per output row, w = q * scale[row]. On a CPU where the C kernel
    builds (agent/decode_kernel.py), decode steps are its products, on q packed for it; elsewhere
    PyTorch's weight-only int8 kernel's, on q as it is.

    On 2 AVX2 cores a step's products of the embedded model took 10.9 ms for one row and 47.3
    for 16 with the C kernel, against 19.4 and 76.8 with PyTorch's, whose rows are converted to
    bfloat16 and back (bench/results/decode-kernel.json)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__(weight)
        weight = weight.float()
        scale = (weight.abs().amax(dim=1) / 127).clamp(min=1e-12)  # [out]
        q = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
        self.packed = decode_kernel.pack(q) if decode_kernel.takes(q) else None
        if self.packed is not None:
            self.q, self.scale = None, scale
        else:
            self.q, self.scale = q, scale.to(KERNEL_DTYPE)
        self.nbytes = q.numel() + self.scale.numel() * self.scale.element_size()

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return decode_kernel.int8_product(x.float(), self.packed, self.scale).to(x.dtype)
        return super().matmul(x)

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x, self.q, self.scale)

    def kernel_operands(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The packed codes and their scales, where they are packed for the C kernel."""
        return None if self.packed is None else (self.packed, self.scale)

    @property
    def kernel_rows(self) -> int:
        """Every decode step's products are the C kernel's where it packed the codes."""
        return sys.maxsize if self.packed is not None else 0


def hold_together(weights: list) -> None:
    """Move the weights packed for the C kernel of `weights` (int8 codes or bfloat16, in the order
    a decode step reads them) into one buffer on huge pages (agent/native.py), each weight's a
    view of it: the step then reads one stream, not a few hundred allocations."""
    packed = [w for w in weights if getattr(w, "packed", None) is not None]
    if not packed:
        return
    buffer = native.huge_page_buffer(sum(w.packed.nbytes for w in packed))
    start = 0
    for weight in packed:
        end = start + weight.packed.nbytes
        weight.packed = buffer[start:end].view(weight.packed.dtype).view(weight.packed.shape).copy_(weight.packed)
        start = end


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


def adapter_kernel_dtype(model_dtype: torch.dtype, weights: str) -> torch.dtype:
    """The dtype the LoRA kernel reads adapters in for decode steps (agent/lora_kernel.py):
    the forward's with weights as loaded, so that float32 drafts stay PEFT's to the token; with
    quantized base weights, whose drafts already differ from float (bench.quantized), bfloat16,
    which halves the bytes each step reads: 8 tenants' rank-16 adapters are 149 MB in float32,
    more than the embedded model's int8 weights."""
    return compute_dtype(model_dtype, weights) if weights == "float" else torch.bfloat16
