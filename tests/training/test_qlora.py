"""The fast QLoRA path computes what bitsandbytes computes: the NF4 base dequantized once and the
LoRA update merged into each step's weights give the same losses and LoRA weights."""

import bitsandbytes as bnb
import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file

from agent.adapters import AdapterRef, attach
from tests.training.helpers import FAST, ROWS
from training.config import TrainConfig
from training.evaluate import example_nll
from training.qlora import MergedLoRA, merge_lora_forward
from training.train import load_training_base, train_adapter

NF4 = FAST | {"quantization": "nf4", "epochs": 2}
# Float32 sums in another order (one merged product instead of three): agreement to 1e-5 relative.
TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}


def has_4bit_layers(model) -> bool:
    return any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


@pytest.fixture(scope="module")
def trained(tiny_base_dir, tokenizer, tmp_path_factory):
    """The same run twice: bitsandbytes applying the NF4 weights on every step, and dequantized once."""
    runs = {}
    for path in ("bitsandbytes", "dequantized"):
        config = TrainConfig(**NF4, nf4_weights=path)
        model = load_training_base(str(tiny_base_dir), config)
        assert has_4bit_layers(model) == (path == "bitsandbytes")
        out = tmp_path_factory.mktemp(path)
        result = train_adapter(model, tokenizer, ROWS, config, out)
        runs[path] = (result, out)
    return runs


def test_the_dequantized_path_trains_like_bitsandbytes(trained):
    (slow, slow_dir), (fast, fast_dir) = trained["bitsandbytes"], trained["dequantized"]
    slow_losses = torch.tensor([h["loss"] for h in slow.loss_history])
    fast_losses = torch.tensor([h["loss"] for h in fast.loss_history])
    assert len(slow_losses) == 4 and slow_losses[-1] < slow_losses[0]
    torch.testing.assert_close(fast_losses, slow_losses, rtol=1e-4, atol=1e-4)  # logged rounded to 4 places
    slow_weights, fast_weights = (
        load_file(slow_dir / "adapter_model.safetensors"),
        load_file(fast_dir / "adapter_model.safetensors"),
    )
    assert slow_weights.keys() == fast_weights.keys()
    for name, weight in slow_weights.items():
        assert weight.dtype == torch.float32, "LoRA weights train in the compute dtype"
        torch.testing.assert_close(fast_weights[name], weight, **TOLERANCE, msg=name)


def test_auto_dequantizes_a_base_that_fits(tiny_base_dir):
    assert not has_4bit_layers(load_training_base(str(tiny_base_dir), TrainConfig(**NF4)))


def test_a_qlora_adapter_scores_on_the_nf4_base_as_it_trained(trained, tiny_base_dir, tokenizer):
    """Scored in eval mode on the 4-bit base, the adapter gives the NLL of the training forward
    (bitsandbytes' CPU repacking for inference is kept off: it gave NLL 15.7 for 2.2)."""
    _, adapter_dir = trained["bitsandbytes"]
    scores = {}
    for path in ("bitsandbytes", "dequantized"):
        model = load_training_base(str(tiny_base_dir), TrainConfig(**NF4, nf4_weights=path)).eval()
        model = attach(model, AdapterRef(id=1, path=adapter_dir))
        scores[path] = torch.tensor(example_nll(model, tokenizer, ROWS))
        if path == "bitsandbytes":
            layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
            assert layers and not any(m.support_avx512bf16_for_cpu for m in layers)
    torch.testing.assert_close(scores["bitsandbytes"], scores["dequantized"], **TOLERANCE)


def test_merged_lora_gives_peft_gradients(tiny_base_dir, tokenizer):
    config = TrainConfig(quantization="none", compute_dtype="float32")
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=list(config.target_modules), task_type="CAUSAL_LM")
    ids = torch.tensor([tokenizer("Hi Marta, order 7 ships Monday.").input_ids])
    results = []
    for merged in (False, True):
        torch.manual_seed(0)
        model = get_peft_model(load_training_base(str(tiny_base_dir), config), lora)
        for name, p in model.named_parameters():
            if "lora_B" in name:  # B starts at zero: give the update something to carry
                torch.nn.init.normal_(p, std=0.1)
        if merged:
            assert merge_lora_forward(model) == 2 * len(config.target_modules)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), grads))
    (loss, grads), (merged_loss, merged_grads) = results
    torch.testing.assert_close(merged_loss, loss, **TOLERANCE)
    assert grads.keys() == merged_grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(merged_grads[name], grad, **TOLERANCE, msg=name)


def test_merged_lora_checks_its_own_gradients():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 5, dtype=torch.float64)
    a = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, a, b: MergedLoRA.apply(x, weight, a, b, 0.5), (x, a, b))
