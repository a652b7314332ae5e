"""The serving engine's base weights: the float products of every batch size equal F.linear's;
held at 8 or 4 bits, the products stay close to float, a
weight already on a 4-bit grid is held as it is, prefills multiply by the float weights, and the
engine drafts with them, adapters too."""

import pytest
import torch

from agent import weights as weight_formats
from agent.kv_cache import KVCache
from agent.llama import Llama
from agent.weights import _Int4Weight, _Int8Weight, _Weight
from tests.agent.engines import engine_for, prompts


def _relative_error(held, weight: torch.Tensor, x: torch.Tensor) -> float:
    exact = x @ weight.t()
    return ((held.matmul(x) - exact).norm() / exact.norm()).item()


@pytest.mark.parametrize("product", sorted(weight_formats.PRODUCTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_decode_product_equals_linear(product, dtype):
    """Each product a decode step may be given (the weight's halves on the right or the left, or
    F.linear) for every row count: the same values, the same layout."""
    torch.manual_seed(2)
    weight = torch.randn(96, 64, dtype=dtype)
    if product not in weight_formats.products_for(weight):
        assert product == "kernel" and dtype != torch.float32  # the C kernel takes float32 weights
        return
    held = _Weight(weight)
    held.by_rows = (None,) + (weight_formats.PRODUCTS[product],) * 8
    for rows in (1, 2, 3, 5, 8, 9, 64):
        x = torch.randn(rows, 64, dtype=dtype)
        tolerance = 1e-5 if dtype == torch.float32 else 2e-2
        product = held.matmul(x)
        assert product.is_contiguous()  # the LoRA kernel takes only contiguous rows
        torch.testing.assert_close(product, torch.nn.functional.linear(x, weight), rtol=tolerance, atol=tolerance)


def test_the_products_are_chosen_per_shape_and_row_count_by_measurement(monkeypatch):
    """choose_products gives each weight, per shape, the product measured fastest for each row
    count (a count between two measured ones takes the larger's, more than the last F.linear's);
    it measures once per process for the same shapes."""
    timed = []

    def fake_measure(group, repeats):  # stands in for the clock: a choice that differs by rows and shape
        timed.append(tuple(group[0].full.shape))
        wide = group[0].full.shape[0] > 64
        return {
            rows: ("halves_left" if rows <= 2 else "linear") if wide else "halves_right"
            for rows in weight_formats.TUNED_ROWS
        }

    monkeypatch.setattr(weight_formats, "_measure", fake_measure)
    monkeypatch.setattr(weight_formats, "_chosen", {})
    wide, narrow = [_Weight(torch.randn(96, 64)) for _ in range(3)], _Weight(torch.randn(32, 64))
    chosen = weight_formats.choose_products([*wide, narrow])
    assert chosen["96x64"][1] == "halves_left" and chosen["32x64"][16] == "halves_right"
    assert sorted(timed) == [(32, 64), (96, 64)]  # each shape timed once, as a group
    for weight in wide:
        assert weight.by_rows[1] is weight.by_rows[2] is weight_formats._halves_left
        assert weight.by_rows[3] is weight.by_rows[32] is weight_formats._linear
    assert narrow.by_rows[3] is narrow.by_rows[32] is weight_formats._halves_right
    assert len(narrow.by_rows) == weight_formats.TUNED_ROWS[-1] + 1  # then F.linear
    weight_formats.choose_products([*wide, narrow])
    assert len(timed) == 2  # measured once per process


def test_a_real_measurement_gives_every_row_count_a_product():
    weights = [_Weight(torch.randn(96, 64)) for _ in range(2)]
    chosen = weight_formats.choose_products(weights, repeats=1)
    assert set(chosen["96x64"]) == set(weight_formats.TUNED_ROWS)
    assert set(chosen["96x64"].values()) <= set(weight_formats.PRODUCTS)
    assert all(product in weight_formats.PRODUCTS.values() for product in weights[0].by_rows[1:])


@pytest.mark.parametrize(("held", "bound"), [(_Int8Weight, 0.01), (_Int4Weight, 0.1)])
def test_quantized_products_stay_close_to_float(held, bound):
    torch.manual_seed(0)
    weight, x = torch.randn(960, 576), torch.randn(5, 576)
    error = _relative_error(held(weight), weight, x)
    assert 0 < error < bound
    assert held(weight).nbytes < _Weight(weight).nbytes / (3 if held is _Int8Weight else 6)


def test_a_weight_on_a_4_bit_grid_is_held_as_it_is():
    """The embedded model was shipped as Q4_1 (per 32 inputs, a scale and a minimum): such a
    weight is reproduced up to the bfloat16 rounding of its scale and zero."""
    torch.manual_seed(1)
    codes = torch.randint(0, 16, (64, 128)).float()
    codes[:, ::32], codes[:, 1::32] = 0, 15  # every group spans the whole grid
    scale, low = torch.rand(64, 4, 1) * 0.01 + 0.001, torch.randn(64, 4, 1) * 0.01
    weight = (codes.view(64, 4, 32) * scale + low).view(64, 128)
    x = torch.randn(3, 128)
    assert _relative_error(_Int4Weight(weight), weight, x) < 0.01  # against ~0.08 for a Gaussian weight


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_the_engine_drafts_with_quantized_weights_and_mixed_adapters(tiny_model, adapters, weights):
    engine = engine_for(tiny_model, weights=weights)
    float_engine = engine_for(tiny_model)
    requests = list(zip(prompts(tiny_model.tokenizer, 4), [0, None, 1, 2], strict=True))
    streams = [engine.submit(p, 10, adapters[c] if c is not None else None) for p, c in requests]
    assert all(len(stream.result(timeout=60)) == 10 for stream in streams)

    with torch.inference_mode():  # scored as the engine computes: the same text's NLL, close to float's
        tokens = torch.tensor(requests[0][0])
        nll = {}
        for name, model in (("float", float_engine.model), (weights, engine.model)):
            logits = model.prefill([tokens], None, KVCache(model, 1, 512).prefill_attention([0], [len(tokens)]), True)
            nll[name] = torch.nn.functional.cross_entropy(logits[:-1].float(), tokens[1:]).item()
    assert abs(nll[weights] / nll["float"] - 1) < (0.01 if weights == "int8" else 0.05), nll
    engine.close()
    float_engine.close()


def test_a_quantized_engine_reads_its_adapters_in_bfloat16_and_drafts_what_float32_adapters_draft(tiny_model, adapters):
    """With int8 base weights the LoRA kernel reads bfloat16 copies of the adapters (half the bytes
    a step reads): the arithmetic stays float32, and mixed tenants' drafts are those of the same
    engine reading the adapters in float32."""
    engine, exact = engine_for(tiny_model, weights="int8"), engine_for(tiny_model, torch.float32, weights="int8")
    requests = list(zip(prompts(tiny_model.tokenizer, 6), [0, None, 1, 2, 1, 0], strict=True))
    drafts = {}
    for name, drafting in (("bfloat16", engine), ("float32", exact)):
        streams = [drafting.submit(p, 16, adapters[c] if c is not None else None) for p, c in requests]
        drafts[name] = [stream.result(timeout=60) for stream in streams]
        held = drafting.adapters.get(adapters[0])
        assert held.kernel_a[0]["attn_in"].dtype == getattr(torch, name)
        assert held.a[0]["attn_in"].dtype == torch.float32  # prefills' products: float32 either way
        drafting.close()
    assert drafts["bfloat16"] == drafts["float32"]


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_a_prefill_multiplies_by_the_float_weights_and_a_decode_step_by_the_quantized(tiny_model, weights):
    """Prefills are bound by arithmetic, where the weight-only kernels are slow: a quantized format
    prefills on the float weights it was made from, a prompt of one token as one of many, so a
    prompt's prefill does not depend on what it is packed with."""
    model = tiny_model.model
    float_model, held = Llama(model, 512), Llama(model, 512, weights)
    torch.manual_seed(2)
    with torch.inference_mode():
        for rows in (1, 5, 80):
            tokens = [torch.randint(0, model.config.vocab_size, (rows,))]
            logits = [
                m.prefill(tokens, None, KVCache(m, 1, 512).prefill_attention([0], [rows]), True)
                for m in (float_model, held)
            ]
            assert torch.equal(logits[0], logits[1]), rows
        tokens, positions = torch.randint(0, model.config.vocab_size, (3,)), torch.tensor([5, 9, 2])
        steps = [
            m.decode(tokens, None, KVCache(m, 3, 512).decode_attention(positions, 10)) for m in (float_model, held)
        ]
        assert not torch.equal(steps[0], steps[1])
