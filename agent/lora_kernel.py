"""The LoRA updates of a decode step's rows on the CPU, by a small C kernel (lora_kernel.c).

A decode step multiplies one to a few rows per adapter by rank-16 matrices: 120 calls a step
(30 layers, 4 input groups), each far too small for a general matrix product. PyTorch spends
more on dispatching and packing them than on the arithmetic (an adapter's update of one row took
2.4 ms a step through `addmm`, 12 us a product), and its batched `bmm` over 8 adapters runs one
tiny product after another. The kernel does one input group of one layer in one call, reading
each adapter's matrices once for all of its rows (bench.lora_paths has the figures). A prefill's
many rows of one adapter are AMX tiles' or AVX-512 BF16 dot products' where the CPU has them
(`add_rows`), else PyTorch's.

It is compiled on first use for the CPU it runs on (agent/native.py). Where it cannot be built,
`load()` is None and the updates stay PyTorch products, with a warning in the log."""

import ctypes
import functools
from pathlib import Path

import torch

from agent import native

SOURCE = Path(__file__).with_name("lora_kernel.c")
DTYPES = (torch.float32, torch.bfloat16)


class _Projection(ctypes.Structure):
    _fields_ = [("b", ctypes.c_void_p)] + [(name, ctypes.c_int64) for name in ("col", "width", "offset", "size")]


class Group(ctypes.Structure):
    """One adapter's input group of one layer as the kernel reads it (lora_kernel.c's group_t). It
    holds the tensors' addresses: whoever holds it also holds the tensors (`keep`)."""

    _fields_ = [("a", ctypes.c_void_p), ("inputs", ctypes.c_int64), ("cols", ctypes.c_int64)]
    _fields_ += [("projections", ctypes.c_int64), ("bf16", ctypes.c_int64), ("projection", _Projection * 3)]

    @classmethod
    def of(cls, a: torch.Tensor, b: dict[str, torch.Tensor], cols: dict[str, tuple[int, int]], slices) -> "Group":
        """a: [in, columns]; b[projection]: [rank, out], float32, or bfloat16 in pairs of rows
        (`pairs`); cols: each projection's columns of a;
        slices: (projection, offset, size) of the group's projections in the fused output."""
        if a.dtype not in DTYPES or not a.is_contiguous():
            raise ValueError(f"the LoRA kernel reads contiguous float32 or bfloat16 matrices, not {a.dtype}")
        bf16 = a.dtype == torch.bfloat16
        inputs, columns = (a.shape[0] * 2, a.shape[1]) if bf16 else a.shape
        group = cls(a=a.data_ptr(), inputs=inputs, cols=columns, bf16=int(bf16))
        group.keep = [a]
        for proj, offset, size in slices:
            if proj in cols:
                start, end = cols[proj]
                matrix = b[proj]
                if matrix.dtype != a.dtype or not matrix.is_contiguous():
                    raise ValueError(
                        f"the LoRA kernel reads an adapter's A and B in one dtype, not {a.dtype} and {matrix.dtype}"
                    )
                group.projection[group.projections] = _Projection(matrix.data_ptr(), start, end - start, offset, size)
                group.projections += 1
                group.keep.append(matrix)
        return group


def pairs(matrix: torch.Tensor) -> torch.Tensor:
    """A bfloat16 matrix [k, n] (k even) as the kernel reads it, its rows in interleaved pairs:
    [k / 2, n, 2], element [k, c] at [k // 2, c, k % 2], so that a 32-bit word holds two rows' values
    of a column (AMX's layout for the matrix it multiplies by; the decode steps' tiles split it)."""
    k, n = matrix.shape
    if k % 2:
        raise ValueError(f"the LoRA kernel reads bfloat16 matrices of an even number of rows, not {k}")
    return matrix.view(k // 2, 2, n).transpose(1, 2).contiguous()


def group(weights, layer: int, name: str, slices) -> Group:
    """One layer's input group of `weights` (a LoraWeights) as the kernel reads it, made once."""
    cache = weights.kernel_groups
    if (layer, name) not in cache:
        cache[layer, name] = Group.of(weights.kernel_a[layer][name], weights.kernel_b[layer], weights.cols, slices)
    return cache[layer, name]


def groups(adapters: list, layer: int, name: str, slices):
    """The input group `name` of one layer of each of `adapters` (LoraWeights) for one call of the
    kernel: their addresses (0 for an adapter without it), or None where none has it. The
    adapters' groups are their own, made once (`group`); whoever holds the addresses holds the
    adapters."""
    if not any(name in adapter.a[layer] for adapter in adapters):
        return None
    addresses = [ctypes.addressof(group(a, layer, name, slices)) if name in a.a[layer] else None for a in adapters]
    return (ctypes.c_void_p * len(adapters))(*addresses)


def step_groups(adapters: list, slices: dict[str, list], layers: int):
    """Every layer's input groups of `adapters` as a whole decode step by the decode kernel reads
    them (agent/decode_kernel.Step): [layers * groups] addresses of `groups`' arrays, the groups
    of `slices` (each group's slices in the fused output) in its order in every layer, 0 where
    none of the adapters has the group. The arrays are kept on the result (`keep`)."""
    arrays = [
        groups(adapters, layer, name, group_slices) for layer in range(layers) for name, group_slices in slices.items()
    ]
    result = (ctypes.c_void_p * len(arrays))(*(None if a is None else ctypes.addressof(a) for a in arrays))
    result.keep = arrays
    return result


def add_to(groups, out: torch.Tensor, x: torch.Tensor, order: torch.Tensor, starts: torch.Tensor) -> None:
    """out [rows, fused out] += each listed row's own adapter's update of x [rows, in] (both
    float32 or both bfloat16, as `usable` checks; each adapter's matrices in their own dtype):
    `groups` the adapters' groups (from `groups`), the rows of adapter i order[starts[i]:starts[i
    + 1]] (int64 tensors)."""
    load().lora_group(
        groups,
        out.data_ptr(),
        out.shape[1],
        x.data_ptr(),
        x.shape[0],
        int(x.dtype == torch.bfloat16),
        starts.shape[0] - 1,
        order.data_ptr(),
        starts.data_ptr(),
        torch.get_num_threads(),
    )


def add_rows(weights, layer: int, name: str, slices, out: torch.Tensor, x: torch.Tensor) -> bool:
    """out [rows, fused out] += one adapter's (a LoraWeights') update of a prefill's rows x [rows,
    in] for one layer's input group (lora_kernel.c's `lora_rows`): by AMX tiles where the CPU has
    them and the rows are float32, else by AVX-512 BF16 dot products; x and out float32 or
    bfloat16 alike, on the CPU, the adapter's kernel copies bfloat16. False, and nothing added,
    where the CPU or the dtypes do not allow it."""
    if not (usable(out, x) and weights.kernel_a[layer][name].dtype == torch.bfloat16):
        return False
    adapter = group(weights, layer, name, slices)
    bf16, threads = int(x.dtype == torch.bfloat16), torch.get_num_threads()
    return bool(
        load().lora_rows(ctypes.byref(adapter), out.data_ptr(), out.shape[1], x.data_ptr(), x.shape[0], bf16, threads)
    )


def usable(out: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether the kernel can take these rows: on the CPU, contiguous, float32 or bfloat16 alike."""
    return (
        out.device.type == "cpu"
        and out.dtype == x.dtype
        and out.dtype in DTYPES
        and out.is_contiguous()
        and x.is_contiguous()
        and load() is not None
    )


@functools.cache
def load() -> ctypes.CDLL | None:
    """The compiled kernel (`lora_group`, `lora_rows`), or None where it cannot be built."""
    built = native.library(SOURCE)
    if built is None:
        return None
    pointer, size, flag = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    built.lora_group.argtypes = [pointer, pointer, size, pointer, size, flag, size, pointer, pointer, flag]
    built.lora_group.restype = None
    built.lora_rows.argtypes = [pointer, pointer, size, pointer, size, flag, flag]
    built.lora_rows.restype = ctypes.c_int
    return built
