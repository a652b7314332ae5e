"""LoRA adapters on the shared base model. Adapter versions are immutable, so an adapter loaded
under its id never needs to be loaded again.

Two consumers: training and evaluation attach adapters to the Hugging Face model with PEFT
(`attach`); the serving engine reads the same files into per-layer matrices it applies itself,
several adapters in one batch (`LoraWeights`), kept in a bounded LRU cache (`AdapterCache`);
the adapters of a batch are stacked side by side (`BatchStacker`) into one `BatchLora`.

An adapter is applied at a scale (its strength): W x + scale * (alpha / r) * B A x, PEFT's
`LoraLayer.set_scale`. The engine folds the scale into B when it loads the adapter, so an
adapter at two scales is two cache entries, and a batch mixes scales per row as it mixes
adapters."""

import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import PreTrainedModel

from core import metrics

# The projections the engine can adapt, by the input they read: one fused matmul per input.
INPUT_GROUPS = {
    "attn_in": ("q_proj", "k_proj", "v_proj"),
    "attn_out": ("o_proj",),
    "mlp_in": ("gate_proj", "up_proj"),
    "mlp_out": ("down_proj",),
}
_KEY = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+_proj)\.lora_([AB])\.weight$")


@dataclass(frozen=True)
class AdapterRef:
    id: int  # the registry's adapter id: immutable, so a safe cache key
    path: Path  # a verified PEFT folder (adapter_config.json + adapter_model.safetensors)
    name: str = ""  # the immutable name a remote server knows it by (training/registry.served_name)
    scale: float = 1.0  # multiplies the adapter's update (training/registry.serving_ref resolves it)

    @property
    def key(self) -> tuple[int, float]:
        """What the engine caches it under: the same adapter at another scale is other weights."""
        return self.id, self.scale


def attach(model: PreTrainedModel, adapter: AdapterRef) -> PreTrainedModel:
    """Load the adapter onto the model with PEFT (once) and make it the active one, at its scale.

    The first adapter wraps the base in a PeftModel; later ones are added beside it. The base
    weights are shared and never copied."""
    from peft import PeftModel

    name = f"adapter-{adapter.id}"
    if not isinstance(model, PeftModel):
        model = PeftModel.from_pretrained(model, str(adapter.path), adapter_name=name, is_trainable=False)
    elif name not in model.peft_config:
        model.load_adapter(str(adapter.path), adapter_name=name, is_trainable=False)
    model.set_adapter(name)
    set_scale(model, name, adapter.scale)
    return model


def set_scale(model: PreTrainedModel, adapter_name: str, scale: float) -> None:
    """PEFT's scale of one adapter: each LoRA layer's scaling becomes scale * alpha / r (not
    cumulative: setting 1.0 restores the trained scaling)."""
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.set_scale(adapter_name, scale)


@dataclass
class LoraWeights:
    """One adapter as the engine applies it: for layer l and input group g, `a[l][g]` is the
    stacked A matrices of the group's projections, transposed ([in, sum of ranks]), and
    `b[l][proj]` that projection's B, transposed and scaled ([rank, out]: the LoRA scaling
    times the adapter's scale, as PEFT's set_scale computes it); its columns in `a[l][g]` are
    `cols[proj]`. `key` is its AdapterRef's (id, scale)."""

    key: tuple[int, float]
    a: list[dict[str, torch.Tensor]]
    b: list[dict[str, torch.Tensor]]
    cols: dict[str, tuple[int, int]]
    nbytes: int

    @classmethod
    def load(cls, ref: AdapterRef, num_layers: int, dtype: torch.dtype, device: torch.device) -> "LoraWeights":
        import json

        config = json.loads((ref.path / "adapter_config.json").read_text())
        if config.get("use_dora") or config.get("rank_pattern") or config.get("alpha_pattern"):
            raise ValueError(f"adapter {ref.id}: DoRA and per-module rank or alpha patterns are not supported")
        rank = config["r"]
        scaling = ref.scale * config["lora_alpha"] / (rank**0.5 if config.get("use_rslora") else rank)
        tensors: dict[tuple[int, str, str], torch.Tensor] = {}
        for key, value in load_file(ref.path / "adapter_model.safetensors").items():
            match = _KEY.search(key)
            if not match or int(match[1]) >= num_layers or match[2] not in _ALL_PROJECTIONS:
                raise ValueError(f"adapter {ref.id}: the serving engine cannot apply the weight {key}")
            tensors[int(match[1]), match[2], match[3]] = value.to(device=device, dtype=dtype)
        projections = sorted({proj for _, proj, _ in tensors}, key=_ALL_PROJECTIONS.index)
        cols, a, b = {}, [], []
        for members in INPUT_GROUPS.values():
            start = 0
            for proj in (p for p in members if p in projections):
                cols[proj] = (start, start + rank)
                start += rank
        for layer in range(num_layers):
            a.append({})
            b.append({})
            for group, members in INPUT_GROUPS.items():
                present = [p for p in members if p in projections]
                if present:
                    a[layer][group] = torch.cat([tensors[layer, p, "A"] for p in present]).t().contiguous()
                for proj in present:
                    b[layer][proj] = (tensors[layer, proj, "B"] * scaling).t().contiguous()
        nbytes = sum(t.numel() * t.element_size() for layer in a + b for t in layer.values())
        return cls(key=ref.key, a=a, b=b, cols=cols, nbytes=nbytes)


_ALL_PROJECTIONS = [proj for members in INPUT_GROUPS.values() for proj in members]


class AdapterCache:
    """Loaded adapters by (id, scale), least recently used evicted past `max_count` adapters or
    `max_bytes`.

    Rows being decoded hold their own reference, so evicting an adapter never disturbs a draft
    in progress; the next request for it loads it again (the base model is never reloaded)."""

    def __init__(self, max_count: int, max_bytes: int, num_layers: int, dtype: torch.dtype, device: torch.device):
        self.max_count, self.max_bytes = max_count, max_bytes
        self._load_args = (num_layers, dtype, device)
        self._entries: OrderedDict[tuple[int, float], LoraWeights] = OrderedDict()
        self._lock = threading.Lock()
        self.loads = 0  # cold loads, for the benchmarks and tests

    def get(self, ref: AdapterRef) -> LoraWeights:
        with self._lock:
            weights = self._entries.get(ref.key)
            if weights is None:
                weights = LoraWeights.load(ref, *self._load_args)
                self.loads += 1
                metrics.ADAPTER_LOADS.inc()
                self._entries[ref.key] = weights
            else:
                metrics.ADAPTER_HITS.inc()
            self._entries.move_to_end(ref.key)
            while len(self._entries) > 1 and (len(self._entries) > self.max_count or self.nbytes > self.max_bytes):
                self._entries.popitem(last=False)
                metrics.ADAPTER_EVICTIONS.inc()
            return weights

    @property
    def nbytes(self) -> int:
        return sum(w.nbytes for w in self._entries.values())

    def __contains__(self, key: tuple[int, float]) -> bool:
        return key in self._entries


@dataclass
class BatchLora:
    """The adapters of the rows in a batch, stacked so that each layer needs one matmul per input
    group plus one per projection, however many adapters there are."""

    a: list[dict[str, torch.Tensor]]  # per layer and group: [in, columns of every adapter]
    b: list[dict[str, torch.Tensor]]  # per layer and projection: [its columns of every adapter, out]
    cols: dict[str, tuple[int, int]]  # a projection's columns in its group's stacked A
    row_mask: dict[str, torch.Tensor | None] = field(default_factory=dict)  # per group: [rows, columns]


class BatchStacker:
    """Builds the `BatchLora` of the engine's batch; keeps the last one, and the stacks of the
    last two sets of adapters (stacking copies their weights)."""

    def __init__(self, dtype: torch.dtype, device: torch.device):
        self.dtype, self.device = dtype, device
        self._lora: BatchLora | None = None
        self._key: tuple | None = None
        self._stacks: OrderedDict[tuple[tuple[int, float], ...], BatchLora] = OrderedDict()

    def stack(self, adapters: list[LoraWeights | None], rows: int) -> BatchLora | None:
        """The stacked adapters of a batch, one entry of `adapters` per sequence of `rows` positions.

        Rebuilt only when the batch's composition changes (a request joins or leaves), not every
        step; a batch of one adapter needs no copy and no mask."""
        key = (tuple(a.key if a else None for a in adapters), rows)
        if key == self._key:
            return self._lora
        present = sorted({a.key: a for a in adapters if a is not None}.values(), key=lambda a: a.key)
        lora = None
        if len(present) == 1:
            lora = BatchLora(a=present[0].a, b=present[0].b, cols=present[0].cols)
        elif present:
            ids = tuple(a.key for a in present)
            if ids not in self._stacks:
                self._stacks[ids] = _stack(present)
                if len(self._stacks) > 2:  # stacks are large: keep the current and the previous
                    self._stacks.popitem(last=False)
            stacked = self._stacks[ids]
            lora = BatchLora(a=stacked.a, b=stacked.b, cols=stacked.cols)
        if lora is not None:
            uniform = len(present) == 1 and None not in key[0]
            for group, members in INPUT_GROUPS.items():
                if uniform or group not in lora.a[0]:
                    lora.row_mask[group] = None
                    continue
                mask = torch.zeros(len(adapters), lora.a[0][group].shape[1], dtype=self.dtype, device=self.device)
                for row, adapter in enumerate(adapters):
                    for proj in (p for p in members if adapter is not None and p in adapter.cols):
                        start, end = _adapter_cols(lora, present, adapter, proj)
                        mask[row, start:end] = 1
                lora.row_mask[group] = mask.repeat_interleave(rows, dim=0)
        self._lora, self._key = lora, key
        return lora


def _stack(adapters: list[LoraWeights]) -> BatchLora:
    """Adapters side by side: in each group's A, the columns of projection p of every adapter
    are contiguous (adapter order), so each projection's update is still a single matmul."""
    projections = [p for members in INPUT_GROUPS.values() for p in members if any(p in a.cols for a in adapters)]
    cols: dict[str, tuple[int, int]] = {}
    for members in INPUT_GROUPS.values():
        start = 0
        for proj in (p for p in members if p in projections):
            width = sum(_width(a, proj) for a in adapters)
            cols[proj] = (start, start + width)
            start += width
    a_layers, b_layers = [], []
    for layer in range(len(adapters[0].a)):
        a_layers.append({})
        b_layers.append({})
        for group, members in INPUT_GROUPS.items():
            parts = []
            for proj in (p for p in members if p in projections):
                for adapter in adapters:
                    if proj in adapter.cols:
                        start, end = adapter.cols[proj]
                        parts.append(adapter.a[layer][group][:, start:end])
                        b_layers[layer].setdefault(proj, []).append(adapter.b[layer][proj])
            if parts:
                a_layers[layer][group] = torch.cat(parts, dim=1)
        b_layers[layer] = {proj: torch.cat(parts) for proj, parts in b_layers[layer].items()}
    return BatchLora(a=a_layers, b=b_layers, cols=cols)


def _width(adapter: LoraWeights, proj: str) -> int:
    if proj not in adapter.cols:
        return 0
    start, end = adapter.cols[proj]
    return end - start


def _adapter_cols(lora: BatchLora, present: list[LoraWeights], adapter: LoraWeights, proj: str) -> tuple[int, int]:
    """Where one adapter's columns for a projection sit in the batch's stacked A."""
    start = lora.cols[proj][0]
    for other in present:
        if other.key == adapter.key:
            return start, start + _width(other, proj)
        start += _width(other, proj)
    raise KeyError(adapter.key)
