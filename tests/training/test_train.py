import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from agent.adapters import AdapterRef, attach
from core.errors import Invalid
from tests.agent.engines import engine_for, plain, prompts
from tests.training.helpers import FAST, ROWS
from training.config import TrainConfig
from training.train import load_training_base, train_adapter


def base_weights(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if "lora_" not in name}


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_training_changes_the_lora_weights_and_not_the_base(tiny_base_dir, tokenizer, tmp_path, quantization):
    config = TrainConfig(**FAST | {"quantization": quantization, "epochs": 2})
    model = load_training_base(str(tiny_base_dir), config)
    before = base_weights(model)
    progress = []
    result = train_adapter(model, tokenizer, ROWS, config, tmp_path, lambda *step: progress.append(step))

    after = {
        name.replace("base_model.model.", "").replace(".base_layer", ""): p for name, p in base_weights(model).items()
    }
    assert set(after) == set(before)
    assert all(torch.equal(before[name], after[name]) for name in before), "base weights changed"
    lora = load_file(tmp_path / "adapter_model.safetensors")
    lora_b = [t for name, t in lora.items() if "lora_B" in name]
    assert lora_b and all(t.abs().sum() > 0 for t in lora_b), "LoRA B starts at zero and must have moved"
    assert result.steps == 4 and len(result.loss_history) == 4 and progress[-1][:2] == (4, 4)
    assert result.loss_history[-1]["loss"] < result.loss_history[0]["loss"]


def test_training_settings_are_checked():
    assert TrainConfig.with_overrides({"rank": 8, "target_modules": ["q_proj"]}).target_modules == ("q_proj",)
    with pytest.raises(Invalid, match=r"rnak: unknown setting \(known: rank, alpha,"):
        TrainConfig.with_overrides({"rnak": 8})
    with pytest.raises(Invalid, match="target_modules: Input should be a valid list"):
        TrainConfig.with_overrides({"target_modules": "q_proj"})
    with pytest.raises(Invalid, match="target_modules.0: Input should be 'q_proj'"):
        TrainConfig.with_overrides({"target_modules": ["qproj"]})
    with pytest.raises(Invalid, match="try_learning_rates: Input should be a valid list"):
        TrainConfig.with_overrides({"try_learning_rates": 0.001})
    with pytest.raises(Invalid, match="rank: Input should be a valid integer"):
        TrainConfig.with_overrides({"rank": "8"})
    with pytest.raises(Invalid, match="learning_rate must be in"):
        TrainConfig.with_overrides({"learning_rate": 5})
    with pytest.raises(Invalid, match="use_dora: unknown setting"):  # no engine here or in vLLM serves DoRA
        TrainConfig.with_overrides({"use_dora": True})


def test_an_empty_training_set_is_refused(tiny_base_dir, tokenizer, tmp_path):
    config = TrainConfig(quantization="none", compute_dtype="float32")
    with pytest.raises(Invalid, match="no usable train-split corrections"):
        train_adapter(load_training_base(str(tiny_base_dir), config), tokenizer, [], config, tmp_path)


def test_rslora_trains_and_is_served_as_peft_serves_it(tiny_model, tiny_base_dir, tokenizer, tmp_path):
    config = TrainConfig.with_overrides(FAST | {"epochs": 1, "use_rslora": True, "validation_fraction": 0})
    train_adapter(load_training_base(str(tiny_base_dir), config), tokenizer, ROWS, config, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["use_rslora"] is True

    ref = AdapterRef(1, tmp_path)
    reference = attach(LlamaForCausalLM.from_pretrained(tiny_base_dir).eval(), ref)
    layer = reference.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.scaling["adapter-1"] == config.alpha / config.rank**0.5  # not alpha / rank
    engine = engine_for(tiny_model)
    for prompt in prompts(tokenizer, 3):
        assert engine.submit(prompt, 10, ref).result(timeout=60) == plain(reference, tokenizer, prompt, 10)
    engine.close()
