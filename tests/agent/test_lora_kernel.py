"""The CPU kernel of decode steps' LoRA updates (agent/lora_kernel.py) adds what PyTorch's
products add: one adapter for every row, and rows of several adapters of different ranks and
projections with rows that have none, in float32 and bfloat16. The engine's token-equality tests
(test_engine.py) run through it too."""

import pytest
import torch

from agent import lora_kernel, native
from agent.adapters import INPUT_GROUPS, KERNEL_ROWS, AdapterRef, BatchStacker, GroupedLora, LoraWeights
from agent.llama import Llama
from tests.factories import random_lora


def test_the_kernel_is_built_here_and_shares_torchs_openmp():
    assert lora_kernel.load() is not None  # a machine with a C compiler, as CI's
    # one OpenMP runtime in the process: a second one's idle team would slow every decode step
    # (agent/threads.py), and its threads would not be PyTorch's
    mapped = {line.split()[-1] for line in open("/proc/self/maps") if "libgomp" in line}
    assert len(mapped) == 1, mapped


@pytest.fixture
def fresh_load():
    """lora_kernel.load as on a first call in a new process, restored after the test."""
    lora_kernel.load.cache_clear()
    yield lora_kernel.load
    lora_kernel.load.cache_clear()


def test_the_kernel_is_built_in_a_private_folder_when_the_cache_cannot_be_written(monkeypatch, tmp_path, fresh_load):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))  # no folder can be made under a file
    assert fresh_load() is not None


def test_without_a_compiler_the_updates_stay_pytorchs(monkeypatch, fresh_load):
    monkeypatch.setattr(native.shutil, "which", lambda name: None)
    assert fresh_load() is None
    assert not lora_kernel.usable(torch.zeros(1, 4), torch.zeros(1, 4))


def random_rows(llama: Llama, group: str, rows: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Random inputs x [rows, in] of one input group of `llama`, and outputs [rows, fused out] to add to."""
    inputs = {"attn_in": llama.embed.shape[1], "attn_out": llama.q_size}
    inputs |= {"mlp_in": llama.embed.shape[1], "mlp_out": llama.intermediate}
    out_size = sum(size for _, _, size in llama.slices[group])
    return torch.randn(rows, inputs[group]).to(dtype), torch.randn(rows, out_size).to(dtype)


# (rows' dtype, the kernel's adapters'): as the forward computes, and float32 rows with the
# bfloat16 copies a quantized model's engine reads (weights.adapter_kernel_dtype)
DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16)]


@pytest.mark.parametrize("dtype,kernel_dtype", DTYPES, ids=["float32", "bfloat16", "float32-rows-bfloat16-adapters"])
@pytest.mark.parametrize("rows", [1, 3, *KERNEL_ROWS.values()])
def test_the_kernel_adds_what_pytorchs_products_add(monkeypatch, tiny_model, adapters, dtype, kernel_dtype, rows):
    """Against PyTorch's products in float32 on the same values: the adapters held in float32 but
    rounded to bfloat16 where the kernel reads them so, so that with bfloat16 rows the one
    difference left is the kernel's rounding of each sum to bfloat16, once. One adapter's rows
    past KERNEL_ROWS are PyTorch's products on the adapter as the forward holds it, or with
    bfloat16 copies a prefill's path where the CPU has bfloat16 products."""
    llama = Llama(tiny_model.model, max_length=8)
    cpu = torch.device("cpu")
    held = [LoraWeights.load(ref, llama.num_layers, cpu, dtype, kernel_dtype) for ref in adapters]
    exact = [LoraWeights.load(ref, llama.num_layers, cpu, torch.float32) for ref in adapters]
    as_read = [LoraWeights.load(ref, llama.num_layers, cpu, torch.float32) for ref in adapters]
    for weights in as_read:
        for matrices in weights.a + weights.b:
            for matrix in matrices.values():
                matrix.copy_(matrix.to(kernel_dtype).float())
    pattern = {"one adapter": [1] * rows, "mixed": [[0, None, 2, 1][row % 4] for row in range(rows)]}
    torch.manual_seed(rows)
    for name, choices in pattern.items():
        lora = BatchStacker(cpu).stack([held[c] if c is not None else None for c in choices])
        past_kernel = name == "one adapter" and rows > KERNEL_ROWS[dtype]
        # bfloat16 copies: a prefill's path (lora_kernel.add_rows; its own test below), else PyTorch's
        # products on the adapter as the forward holds it
        by_rows = past_kernel and kernel_dtype == torch.bfloat16 and torch.cpu._is_avx512_bf16_supported()
        by_pytorch = past_kernel and not by_rows
        reference = BatchStacker(cpu).stack(
            [(exact if by_pytorch else as_read)[c] if c is not None else None for c in choices]
        )
        if name == "mixed" and rows > 1:
            assert isinstance(lora, GroupedLora)
        for layer in range(llama.num_layers):
            for group in INPUT_GROUPS:
                slices = llama.slices[group]
                x, out = random_rows(llama, group, rows, dtype)
                got = out.clone()
                lora.add_to(got, x, layer, group, slices)
                with monkeypatch.context() as patch:
                    patch.setattr(lora_kernel, "usable", lambda out, x: False)
                    expected = out.to(torch.float32, copy=True)
                    reference.add_to(expected, x.float(), layer, group, slices)
                assert not torch.equal(expected, out.float())  # the update did something
                # float32: the same sums in another order; bfloat16: one rounding of each
                tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 4e-3, "atol": 4e-3}
                if by_rows:  # x and x @ A rounded to bfloat16 as well
                    tolerance = {"rtol": 1e-2, "atol": 1e-2}
                torch.testing.assert_close(got.float(), expected, **tolerance, msg=f"{name}, layer {layer}, {group}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 16, 37])
def test_a_prefills_rows_are_the_kernels_where_the_cpu_has_bfloat16_products(tiny_model, tmp_path, rows, dtype):
    """One adapter's update of many rows with bfloat16 kernel copies (a quantized engine's, or a
    bfloat16 model's) is the kernel's where the CPU has AVX-512 BF16 (AMX tiles' for float32 rows
    where it has AMX too), and equals float32 products on the same rounded values (x and x @ A
    rounded to bfloat16 as the products take them; bfloat16 rows' sums rounded once); elsewhere
    nothing is added and PyTorch's products do it. Rows past a whole tile are added through one of
    their own."""
    config = tiny_model.model.config
    ref = AdapterRef(9, random_lora(config, tmp_path, rank=16, seed=3))
    llama = Llama(tiny_model.model, max_length=8)
    cpu = torch.device("cpu")
    held = LoraWeights.load(ref, llama.num_layers, cpu, dtype, torch.bfloat16)
    exact = LoraWeights.load(ref, llama.num_layers, cpu, torch.float32)
    rounded = lambda t: t.to(torch.bfloat16).float()  # noqa: E731
    torch.manual_seed(rows)
    for layer in range(llama.num_layers):
        for name in INPUT_GROUPS:
            slices = llama.slices[name]
            x, out = random_rows(llama, name, rows, dtype)
            got = out.clone()
            taken = lora_kernel.add_rows(held, layer, name, slices, got, x)
            assert taken == torch.cpu._is_avx512_bf16_supported()
            if not taken:
                assert torch.equal(got, out)
                continue
            expected = out.to(torch.float32, copy=True)
            xa = rounded(rounded(x.float()) @ rounded(exact.a[layer][name]))
            for proj, offset, size in slices:
                start, end = exact.cols[proj]
                expected[:, offset : offset + size] += xa[:, start:end] @ rounded(exact.b[layer][proj])
            assert not torch.equal(expected.to(dtype), out)
            # float32: the same sums in another order; bfloat16: each rounded once, maybe the other way
            tolerance = {"rtol": 1e-3, "atol": 1e-3} if dtype == torch.float32 else {"rtol": 8e-3, "atol": 8e-3}
            torch.testing.assert_close(got.float(), expected, **tolerance, msg=f"layer {layer}, {name}")


def test_an_adapter_of_odd_rank_is_read_in_float32(tiny_model, tmp_path):
    """bfloat16 kernel copies are held in pairs of rows, which an odd rank does not fill: such an
    adapter's copies are float32, and the kernel adds what PyTorch's products add."""
    ref = AdapterRef(7, random_lora(tiny_model.model.config, tmp_path, rank=3, seed=5))
    llama = Llama(tiny_model.model, max_length=8)
    held = LoraWeights.load(ref, llama.num_layers, torch.device("cpu"), torch.float32, torch.bfloat16)
    assert held.kernel_a[0]["attn_in"].dtype == torch.float32
    x, slices = torch.randn(2, llama.embed.shape[1]), llama.slices["attn_in"]
    out = torch.zeros(2, sum(size for _, _, size in slices))
    held.add_to(out, x, 0, "attn_in", slices)
    expected = torch.zeros_like(out)
    xa = x @ held.a[0]["attn_in"]
    for proj, offset, size in slices:
        start, end = held.cols[proj]
        expected[:, offset : offset + size] += xa[:, start:end] @ held.b[0][proj]
    assert expected.abs().sum() > 0
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
