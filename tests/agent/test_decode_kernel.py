"""The C kernel of decode steps (agent/decode_kernel.py): its float32 and int8 products equal
PyTorch's, and its attention (RoPE, cache writes, attention) equals the PyTorch path's, for every
row count a step has, sequences at different positions. The engine's token-equality tests
(test_engine.py) run through it too."""

import copy
import sys

import pytest
import torch

from agent import decode_kernel, native
from agent.adapters import AdapterCache, BatchStacker
from agent.kv_cache import KVCache
from agent.llama import Llama
from agent.weights import _Int8Weight

ROWS = [1, 2, 3, 4, 5, 7, 16]


def test_the_kernel_is_built_here():
    assert decode_kernel.load() is not None  # a machine with a C compiler and AVX2, as CI's


@pytest.mark.parametrize("rows", ROWS)
def test_the_float32_product_equals_linear(rows):
    torch.manual_seed(rows)
    weight, x = torch.randn(96, 48), torch.randn(rows, 48)
    assert decode_kernel.takes(weight)
    product = decode_kernel.f32_product(x, weight)
    torch.testing.assert_close(product, torch.nn.functional.linear(x, weight), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", ROWS)
def test_the_int8_product_equals_the_dequantized_weights_product(rows):
    """Against the float product of the weights the codes stand for (q * scale), and against
    PyTorch's int8 kernel on the same codes (bfloat16 rows, so within its rounding)."""
    torch.manual_seed(rows)
    held, x = _Int8Weight(torch.randn(112, 48)), torch.randn(rows, 48)
    assert held.packed is not None  # the kernel's
    codes = held.packed.transpose(1, 2).reshape(112, 48)  # unpacked
    exact = x @ (codes.float() * held.scale[:, None]).t()
    torch.testing.assert_close(held.matmul(x), exact, rtol=1e-5, atol=1e-4)
    theirs = torch.ops.aten._weight_int8pack_mm(x.bfloat16(), codes, held.scale.bfloat16()).float()
    torch.testing.assert_close(held.matmul(x), theirs, rtol=2e-2, atol=5e-2)


@pytest.mark.parametrize("rows", ROWS)
def test_the_bfloat16_product_equals_the_float32_product_of_the_same_values(rows):
    """bfloat16 weights packed for the kernel's AVX-512 BF16 dot products, 112 outputs (two blocks
    of 48 and one of 16): the float32 product of the same bfloat16 values, up to the order of its
    float32 sums. Taken exactly where the CPU has the dot products."""
    torch.manual_seed(rows)
    weight, x = torch.randn(112, 48).bfloat16(), torch.randn(rows, 48).bfloat16()
    assert decode_kernel.takes(weight) == torch.cpu._is_avx512_bf16_supported()
    if not decode_kernel.takes(weight):
        pytest.skip("this CPU has no AVX-512 BF16: PyTorch multiplies bfloat16 weights")
    product = decode_kernel.bf16_product(x, decode_kernel.pack_bf16(weight), 112)
    torch.testing.assert_close(product, x.float() @ weight.float().t(), rtol=1e-5, atol=1e-5)


def test_int8_weights_keep_pytorchs_kernel_where_the_kernel_does_not_take_them():
    held = _Int8Weight(torch.randn(100, 48))  # 100 outputs: not whole blocks
    assert held.packed is None and held.q is not None
    x = torch.randn(3, 48)
    expected = x @ (held.q.float() * held.scale.float()[:, None]).t()
    torch.testing.assert_close(held.matmul(x), expected, rtol=2e-2, atol=5e-2)


@pytest.mark.parametrize("rows", [1, 3, 16])
def test_the_attention_equals_pytorchs(monkeypatch, tiny_model, rows):
    """Rows at different positions of caches already holding keys and values: the same attended
    values, and the same keys (rotated) and values written at each row's position."""
    llama = Llama(tiny_model.model, max_length=64)
    torch.manual_seed(rows)
    positions = torch.randint(0, 40, (rows,))
    qkv = torch.randn(rows, llama.q_size + 2 * llama.kv_size)
    caches = []
    for by_kernel in (True, False):
        cache = KVCache(llama, 16, 64)
        for tensor in (*cache.k, *cache.v):
            tensor.copy_(torch.randn(tensor.shape, generator=torch.Generator().manual_seed(7)))
        with monkeypatch.context() as patch:
            if not by_kernel:
                patch.setattr(decode_kernel, "takes_attention", lambda cache, head_dim: False)
            attend = cache.decode_attention(positions, span=int(positions.max()) + 1)
            caches.append((cache, [attend(layer, qkv) for layer in range(llama.num_layers)]))
    (ours, our_out), (theirs, their_out) = caches
    for layer in range(llama.num_layers):
        torch.testing.assert_close(our_out[layer], their_out[layer], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.k[layer], theirs.k[layer], rtol=1e-6, atol=1e-6)
        assert torch.equal(ours.v[layer], theirs.v[layer])


def test_a_bfloat16_model_attends_by_the_kernel_in_float32(monkeypatch, tiny_model):
    """A bfloat16 model's decode steps by parts (as on a CPU without AVX-512 BF16, where the
    kernel does not take its weights) attend by the kernel over the float32 cache, their rows
    converted there and back: the logits of the PyTorch path within bfloat16's rounding, in
    bfloat16."""
    llama = Llama(copy.deepcopy(tiny_model.model).to(torch.bfloat16), max_length=64)
    llama.step_rows = 0  # by parts
    positions, tokens = torch.tensor([3, 9, 5]), torch.tensor([11, 12, 13])
    logits = []
    for by_kernel in (True, False):
        with monkeypatch.context() as patch:
            if not by_kernel:
                patch.setattr(decode_kernel, "takes_attention", lambda cache, head_dim: False)
            cache = KVCache(llama, 4, 64)
            with torch.inference_mode():
                logits.append(llama.decode(tokens, None, cache.decode_attention(positions, span=10)))
    assert logits[0].dtype == torch.bfloat16
    torch.testing.assert_close(logits[0].float(), logits[1].float(), rtol=2e-2, atol=2e-2)


def test_the_attention_kernel_refuses_rows_that_are_not_float32():
    with pytest.raises(ValueError, match="float32"):
        decode_kernel.attention(torch.zeros(1, 8, dtype=torch.bfloat16), None, 1, None, None, None, None)


def test_without_the_kernel_a_decode_step_gives_the_same_logits(monkeypatch, tiny_model):
    """Where the kernel cannot be built (no compiler, a CPU without AVX2), every part of a decode
    step falls back to PyTorch: the same logits, int8 weights on PyTorch's int8 kernel."""
    positions = torch.tensor([3, 5])
    tokens = torch.tensor([11, 12])

    def logits(weights: str) -> torch.Tensor:
        llama = Llama(tiny_model.model, max_length=16, weights=weights)
        cache = KVCache(llama, 2, 16)
        with torch.inference_mode():
            return llama.decode(tokens, None, cache.decode_attention(positions, span=6))

    built = {weights: logits(weights) for weights in ("float", "int8")}
    monkeypatch.setattr(native.shutil, "which", lambda name: None)
    decode_kernel.load.cache_clear()
    try:
        assert decode_kernel.load() is None
        for weights, expected in built.items():
            tolerance = 1e-4 if weights == "float" else 5e-2  # int8: bfloat16 rows into PyTorch's kernel
            torch.testing.assert_close(logits(weights), expected, rtol=tolerance, atol=tolerance)
    finally:
        decode_kernel.load.cache_clear()


def _batch_lora(adapters, tiny_model, choice: str, rows: int):
    """None, one adapter on every row, or three adapters and bare rows interleaved (GroupedLora)."""
    if choice == "none":
        return None
    config = tiny_model.model.config
    cache = AdapterCache(4, 2**30, config.num_hidden_layers, tiny_model.model.device, torch.float32)
    loaded = [cache.get(ref) for ref in adapters]
    per_row = [loaded[0]] * rows if choice == "one" else [([*loaded, None])[i % 4] for i in range(rows)]
    return BatchStacker(tiny_model.model.device).stack(per_row)


@pytest.mark.parametrize("weights", ["float", "int8"])
@pytest.mark.parametrize("choice", ["none", "one", "mixed"])
@pytest.mark.parametrize("rows", [1, 3, 16])
def test_a_whole_step_equals_the_step_by_parts(tiny_model, adapters, weights, choice, rows):
    """One call of the kernel for the whole step (decode_kernel.Step) against the step by parts
    (a kernel or PyTorch call per product, attention, norm and LoRA update): the same logits (its
    SiLU's exp is the kernel's own, hence the tolerance) and the same keys and values cached, with
    no adapter, one adapter on every row, and several adapters beside bare rows."""
    llama = Llama(tiny_model.model, max_length=64, weights=weights)
    assert llama.step is not None
    llama.step_rows = sys.maxsize  # whatever products were measured fastest for float32 here
    torch.manual_seed(rows)
    positions, tokens = torch.randint(0, 40, (rows,)), torch.randint(0, llama.vocab_size, (rows,))
    lora = _batch_lora(adapters, tiny_model, choice, rows)
    results = []
    for whole in (True, False):
        cache = KVCache(llama, 16, 64)
        for tensor in (*cache.k, *cache.v):
            tensor.copy_(torch.randn(tensor.shape, generator=torch.Generator().manual_seed(7)))
        attend = cache.decode_attention(positions, span=int(positions.max()) + 1)
        with torch.inference_mode():
            if whole:
                logits = llama.decode(tokens, lora, attend)
            else:
                logits = llama.logits(llama._forward(tokens, lora, attend, prefill=False), prefill=False)
        results.append((logits, cache))
    (ours, our_cache), (theirs, their_cache) = results
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    for layer in range(llama.num_layers):
        torch.testing.assert_close(our_cache.k[layer], their_cache.k[layer], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(our_cache.v[layer], their_cache.v[layer], rtol=1e-4, atol=1e-4)


def test_int8_weights_are_held_in_one_buffer_in_step_order(tiny_model):
    """The packed codes a step reads one after another lie one after another in memory."""
    llama = Llama(tiny_model.model, max_length=64, weights="int8")
    packed = [w.packed for w in llama.step_weights]
    for before, after in zip(packed, packed[1:], strict=False):
        assert after.data_ptr() == before.data_ptr() + before.numel()


@pytest.mark.parametrize("choice", ["none", "one", "mixed"])
@pytest.mark.parametrize("rows", [1, 3, 16])
def test_a_bfloat16_models_whole_step_gives_the_float32_logits_of_its_weights(tiny_model, adapters, choice, rows):
    """A bfloat16 model's whole step, where the CPU has AVX-512 BF16 (its products the kernel's dot
    products, its rows float32 between them), against a float32 model holding the same bfloat16
    values: the same logits and cache within the rounding of each product's rows to bfloat16."""
    bf16_model = copy.deepcopy(tiny_model.model).to(torch.bfloat16)
    llama = Llama(bf16_model, max_length=64)
    if not torch.cpu._is_avx512_bf16_supported():
        assert llama.step is None
        pytest.skip("this CPU has no AVX-512 BF16: a bfloat16 model's steps go by parts")
    assert llama.step is not None
    exact = Llama(copy.deepcopy(bf16_model).float(), max_length=64)
    torch.manual_seed(rows)
    positions, tokens = torch.randint(0, 40, (rows,)), torch.randint(0, llama.vocab_size, (rows,))
    lora = _batch_lora(adapters, tiny_model, choice, rows)
    results = []
    for model in (llama, exact):
        model.step_rows = sys.maxsize
        cache = KVCache(model, 16, 64)
        for tensor in (*cache.k, *cache.v):
            tensor.copy_(torch.randn(tensor.shape, generator=torch.Generator().manual_seed(7)))
        with torch.inference_mode():
            logits = model.decode(tokens, lora, cache.decode_attention(positions, span=int(positions.max()) + 1))
        results.append((logits, cache))
    (ours, our_cache), (theirs, their_cache) = results
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, rtol=1e-2, atol=1e-2)  # differences up to 6e-3 seen
    for layer in range(llama.num_layers):
        torch.testing.assert_close(our_cache.k[layer], their_cache.k[layer], rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(our_cache.v[layer], their_cache.v[layer], rtol=1e-2, atol=1e-2)
