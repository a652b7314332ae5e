"""LoRA adapters on the shared base model. Adapter versions are immutable, so a model that has
loaded an adapter under its id never needs to load it again."""

from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedModel


@dataclass(frozen=True)
class AdapterRef:
    id: int  # the registry's adapter id: immutable, so a safe cache key
    path: Path  # a verified PEFT folder (adapter_config.json + adapter_model.safetensors)


def attach(model: PreTrainedModel, adapter: AdapterRef) -> PreTrainedModel:
    """Load the adapter onto the model (once) and make it the active one.

    The first adapter wraps the base in a PeftModel; later ones are added beside it. The base
    weights are shared and never copied."""
    from peft import PeftModel

    name = f"adapter-{adapter.id}"
    if not isinstance(model, PeftModel):
        model = PeftModel.from_pretrained(model, str(adapter.path), adapter_name=name, is_trainable=False)
    elif name not in model.peft_config:
        model.load_adapter(str(adapter.path), adapter_name=name, is_trainable=False)
    model.set_adapter(name)
    return model
