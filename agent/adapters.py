"""LoRA adapters on the shared base model. Adapter versions are immutable, so an adapter loaded
under its id never needs to be loaded again.

Two consumers: training and evaluation attach adapters to the Hugging Face model with PEFT
(`attach`); the serving engine reads the same files into per-layer matrices it applies itself,
several adapters in one batch (`LoraWeights`), kept in a bounded LRU cache (`AdapterCache`);
a decode step whose rows have different adapters groups its rows by adapter (`GroupedLora`,
built by `BatchStacker`), so that each row pays for its own adapter's update only, and a
prefill pack applies each adapter to its own prompts' rows (`SegmentLora`, built by
`pack_lora`). On the CPU, decode steps' updates are a small C kernel's (agent/lora_kernel.py),
prefills' PyTorch's matrix products.

Adapters are held in the dtype the forward computes in (agent/weights.compute_dtype): float32,
or bfloat16 for a bfloat16 model, which halves the bytes a decode step reads per adapter and lets
prefills use bfloat16 matrix products. On the CPU the kernel reads copies of them from one buffer
per adapter, in bfloat16 where the base weights are quantized (weights.adapter_kernel_dtype), and
with those a prefill's rows by AMX tiles or AVX-512 BF16 dot products where the CPU has them
(lora_kernel.add_rows).

An adapter is applied at a scale (its strength): W x + scale * (alpha / r) * B A x, PEFT's
`LoraLayer.set_scale`. The engine folds the scale into B when it loads the adapter, so an adapter
at two scales is two cache entries, and a batch mixes scales per row as it mixes adapters."""

import functools
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import PreTrainedModel

from agent import lora_kernel, native
from core import metrics

# The projections the engine can adapt, by the input they read: one fused matmul per input.
INPUT_GROUPS = {
    "attn_in": ("q_proj", "k_proj", "v_proj"),
    "attn_out": ("o_proj",),
    "mlp_in": ("gate_proj", "up_proj"),
    "mlp_out": ("down_proj",),
}
_KEY = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+_proj)\.lora_([AB])\.weight$")
# Up to this many rows (by dtype) one adapter's update is the CPU kernel's (agent/lora_kernel.py),
# past it PyTorch's products, which the kernel does not beat at larger row counts. Measured on 2
# AVX-512 BF16 cores, one rank-16 adapter's update of 30 layers, kernel against PyTorch, ms: in
# float32 2.7 / 3.9 at 4 rows, 3.3 / 3.6 at 6, 4.1 / 3.9 at 8, 6.1 / 3.8 at 16 (MKL's products);
# in bfloat16 1.6 / 8.4 at 1 row, 4.7 / 10.3 at 16, while at a prefill's 240 rows oneDNN's
# bfloat16 products took 18 ms against the kernel's 44. Rows of several adapters (GroupedLora)
# are always the kernel's: 9.7-13.4 against 14.9-15.8 ms for 8 adapters' 16 rows in float32.
KERNEL_ROWS = {torch.float32: 6, torch.bfloat16: 16}


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
    `cols[proj]`. `key` is its AdapterRef's (id, scale). `kernel_a` and `kernel_b` are the same
    matrices as the CPU kernel reads them in decode steps (agent/lora_kernel.py): `a` and `b`
    themselves, or their bfloat16 copies where the engine's base weights are quantized
    (weights.adapter_kernel_dtype)."""

    key: tuple[int, float]
    a: list[dict[str, torch.Tensor]]
    b: list[dict[str, torch.Tensor]]
    kernel_a: list[dict[str, torch.Tensor]]
    kernel_b: list[dict[str, torch.Tensor]]
    cols: dict[str, tuple[int, int]]
    nbytes: int
    kernel_groups: dict = field(default_factory=dict, repr=False)  # (layer, group) -> lora_kernel.Group, "step"

    def add_to(self, out: torch.Tensor, x: torch.Tensor, layer: int, group: str, slices) -> None:
        """out [rows, fused out] += this adapter's update of x [rows, in], every row alike;
        `slices`: (projection, offset, size) of each projection of the group in the fused output."""
        if group not in self.a[layer]:
            return
        rows = x.shape[0]
        if rows <= KERNEL_ROWS.get(x.dtype, 0) and lora_kernel.usable(out, x):
            groups = lora_kernel.groups([self], layer, group, slices)
            lora_kernel.add_to(groups, out, x, *_every_row(rows))
            return
        if lora_kernel.add_rows(self, layer, group, slices, out, x):
            return  # a prefill's rows by the kernel, where the CPU has bfloat16 products
        xa = x @ self.a[layer][group]  # [rows, columns]
        for proj, offset, size in slices:
            if proj in self.cols:
                start, end = self.cols[proj]
                out[:, offset : offset + size].addmm_(xa[:, start:end], self.b[layer][proj])

    def kernel_step(self, rows: int, slices: dict[str, list], layers: int):
        """For a whole decode step by the kernel: this adapter's groups as it reads them
        (lora_kernel.step_groups, made once) and the rows by adapter, every row with this one
        (order, starts)."""
        if "step" not in self.kernel_groups:
            self.kernel_groups["step"] = lora_kernel.step_groups([self], slices, layers)
        return self.kernel_groups["step"], *_every_row(rows)

    @classmethod
    def load(
        cls, ref: AdapterRef, num_layers: int, device: torch.device, dtype: torch.dtype, kernel_dtype=None
    ) -> "LoraWeights":
        """The adapter's matrices in `dtype`, and in `kernel_dtype` for the kernel (default: the same;
        float32 for an odd rank, which its bfloat16 layout cannot hold)."""
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
            tensors[int(match[1]), match[2], match[3]] = value.to(device=device, dtype=torch.float32)
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
                    a[layer][group] = torch.cat([tensors[layer, p, "A"] for p in present]).t().contiguous().to(dtype)
                for proj in present:
                    b[layer][proj] = (tensors[layer, proj, "B"] * scaling).t().contiguous().to(dtype)
        kernel_a, kernel_b = a, b
        if device.type == "cpu":
            kernel_dtype = kernel_dtype or dtype
            if kernel_dtype == torch.bfloat16 and rank % 2:  # bfloat16 is read in pairs of rows
                kernel_dtype = torch.float32
            kernel_a, kernel_b = _together(a, b, kernel_dtype)
            if kernel_dtype == dtype == torch.float32:
                a, b = kernel_a, kernel_b  # the same values and layout, held once
        held = {id(t): t for layers in (a, b, kernel_a, kernel_b) for layer in layers for t in layer.values()}
        nbytes = sum(t.numel() * t.element_size() for t in held.values())
        return cls(key=ref.key, a=a, b=b, kernel_a=kernel_a, kernel_b=kernel_b, cols=cols, nbytes=nbytes)


_ALL_PROJECTIONS = [proj for members in INPUT_GROUPS.values() for proj in members]


def _together(a, b, dtype: torch.dtype):
    """Copies of an adapter's matrices (LoraWeights' a and b) in `dtype` (bfloat16 in pairs of rows,
    lora_kernel.pairs), as views of one buffer on huge pages (agent/native.py) in the order a decode
    step reads them: each layer's input groups, the group's A, then its projections' B. The kernel
    then reads one stream per adapter: on 2 AVX-512 Xeon cores a whole int8 step's updates for 8
    tenants' 16 rows took 4.0 ms a step, against 4.8 with each matrix held apart (bfloat16
    adapters)."""
    laid_out = lora_kernel.pairs if dtype == torch.bfloat16 else lambda matrix: matrix
    order = [
        (m, layer, key)
        for layer in range(len(a))
        for group, members in INPUT_GROUPS.items()
        for m, key in ((a, group), *((b, p) for p in members))
        if key in m[layer]
    ]
    elements = sum(m[layer][key].numel() for m, layer, key in order)
    buffer = native.huge_page_buffer(elements * dtype.itemsize).view(dtype)
    copies = {id(a): [{} for _ in a], id(b): [{} for _ in b]}
    start = 0
    for m, layer, key in order:
        matrix = laid_out(m[layer][key].to(dtype))
        copies[id(m)][layer][key] = buffer[start : start + matrix.numel()].view(matrix.shape).copy_(matrix)
        start += matrix.numel()
    return copies[id(a)], copies[id(b)]


@functools.cache
def _every_row(rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's row lists for one adapter over rows 0..rows-1: (order, starts)."""
    return torch.arange(rows), torch.tensor([0, rows])


class AdapterCache:
    """Loaded adapters by (id, scale), least recently used evicted past `max_count` adapters or
    `max_bytes`.

    Rows being decoded hold their own reference, so evicting an adapter never disturbs a draft
    in progress; the next request for it loads it again (the base model is never reloaded)."""

    def __init__(
        self,
        max_count: int,
        max_bytes: int,
        num_layers: int,
        device: torch.device,
        dtype: torch.dtype,
        kernel_dtype=None,
    ):
        self.max_count, self.max_bytes, self.dtype = max_count, max_bytes, dtype
        self._load_args = (num_layers, device, dtype, kernel_dtype)
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


class GroupedLora:
    """The adapters of a decode step (a row per sequence) whose rows do not all share one
    adapter: rows are grouped by adapter, so each row pays only for its own adapter's update.

    On the CPU the kernel (agent/lora_kernel.py) does it in one call per input group, from the
    rows listed by adapter (`order`, `starts`) and each adapter's matrices where it holds them:
    nothing padded, gathered or copied. Elsewhere (other devices and dtypes), for every layer,
    one batched matmul per input group (`a`: [adapters, in, columns]) and one per projection
    (`b`: [adapters, its columns, out]) over the rows gathered per adapter (`gather`: [adapters
    * width], each adapter's rows padded to `width` with a repeat of its first), then the group's
    updates are added to each real row's output in one step: gathered back by `place` (each
    row's slot) when every row has an adapter, else added at `dest` from the slots `take`. That
    path reads the adapters stacked in one zero-padded layout (`_Stack`, made by the
    BatchStacker on first use): PyTorch's CPU `bmm` runs one tiny product per adapter after
    another, so on the CPU the batched path cost per adapter what a whole matrix product would
    (8 adapters' 16 rows, 30 layers: 7.7 against 12.6 ms a step, bench.lora_paths), and stacking
    8 adapters copied 149 MB whenever the set of adapters in the batch changed."""

    def __init__(self, present: list[LoraWeights], adapters: list[LoraWeights | None], stacker: "BatchStacker"):
        self.present, self._stacker, device = present, stacker, stacker.device
        keys = [adapter.key for adapter in present]
        members = [[] for _ in present]
        for row, adapter in enumerate(adapters):
            if adapter is not None:
                members[keys.index(adapter.key)].append(row)
        self.order = torch.tensor([row for m in members for row in m])  # the kernel's rows, by adapter
        self.starts = torch.tensor([0] + [len(m) for m in members]).cumsum(0)
        self.width = max(len(m) for m in members)
        padded = [m + [m[0]] * (self.width - len(m)) for m in members]
        self.gather = torch.tensor([row for m in padded for row in m], device=device)  # [adapters * width]
        slots = {row: i * self.width + j for i, m in enumerate(members) for j, row in enumerate(m)}
        self.place = self.take = self.dest = None
        if len(slots) == len(adapters):  # every row has an adapter
            self.place = torch.tensor([slots[row] for row in range(len(slots))], device=device)
        else:
            self.take = torch.tensor(list(slots.values()), device=device)
            self.dest = torch.tensor(list(slots), device=device)
        self._groups: dict = {}  # the kernel's groups of the present adapters, by (layer, group) and "step"

    def kernel_step(self, rows: int, slices: dict[str, list], layers: int):
        """For a whole decode step by the kernel: the adapters' groups (lora_kernel.step_groups,
        made once per batch composition) and the rows by adapter (order, starts)."""
        if "step" not in self._groups:
            self._groups["step"] = lora_kernel.step_groups(self.present, slices, layers)
        return self._groups["step"], self.order, self.starts

    def add_to(self, out: torch.Tensor, x: torch.Tensor, layer: int, group: str, slices) -> None:
        """out [rows, fused out] += each row's own adapter's update of x [rows, in]."""
        if lora_kernel.usable(out, x):
            if (layer, group) not in self._groups:
                self._groups[layer, group] = lora_kernel.groups(self.present, layer, group, slices)
            groups = self._groups[layer, group]
            if groups is not None:
                lora_kernel.add_to(groups, out, x, self.order, self.starts)
            return
        stack = self._stacker.stacked(self.present)
        if group not in stack.a[layer]:
            return
        rows = x.index_select(0, self.gather)
        gathered = rows.view(-1, self.width, x.shape[-1])  # [adapters, width, in]
        xa = torch.bmm(gathered, stack.a[layer][group])  # [adapters, width, columns]
        updates = []
        for proj, offset, size in slices:
            if proj in stack.cols:
                start, end = stack.cols[proj]
                update = torch.bmm(xa[:, :, start:end], stack.b[layer][proj]).view(-1, size)  # [slots, size]
                updates.append((offset, size, update))
        if len(updates) == len(slices):  # the whole fused output at once
            whole = torch.cat([u for _, _, u in updates], dim=-1) if len(updates) > 1 else updates[0][2]
            updates = [(0, out.shape[-1], whole)]
        for offset, size, update in updates:
            target = out[:, offset : offset + size]
            if self.place is not None:
                target.add_(update.index_select(0, self.place))
            else:
                target.index_add_(0, self.dest, update.index_select(0, self.take))


@dataclass
class _Stack:
    """Several adapters in one layout (GroupedLora's path without the kernel), in the order of its
    `present` adapters."""

    a: list[dict[str, torch.Tensor]]
    b: list[dict[str, torch.Tensor]]
    cols: dict[str, tuple[int, int]]


class SegmentLora:
    """The adapters of a prefill pack (prompts one after another in one forward: Llama.prefill)
    whose prompts do not all share one adapter. `runs` are (start, end, adapter), one per run of
    contiguous rows with the same adapter; each run adds its adapter's update to its own rows
    [start, end) as a single adapter would (`LoraWeights.add_to` on the slices), and rows
    without an adapter are in no run.

    Nothing is stacked or gathered: a prompt's rows are many (tens to hundreds), so each run's
    products are already matrix-matrix ones, and GroupedLora would pad every adapter's rows to
    the longest prompt's."""

    def __init__(self, runs: list[tuple[int, int, LoraWeights]]):
        self.runs = runs

    def add_to(self, out: torch.Tensor, x: torch.Tensor, layer: int, group: str, slices) -> None:
        """out [rows, fused out] += each run's adapter's update of its rows of x [rows, in]."""
        for start, end, adapter in self.runs:
            adapter.add_to(out[start:end], x[start:end], layer, group, slices)


# one adapter for every row, rows grouped by adapter (a decode step), or runs of rows (a prefill pack)
BatchLora = LoraWeights | GroupedLora | SegmentLora


class BatchStacker:
    """Builds the `BatchLora` of the engine's decode steps; keeps the last one, and the stacked
    layouts of the last two sets of adapters where a GroupedLora needs one (stacking copies their
    weights; the kernel's path needs none)."""

    def __init__(self, device: torch.device):
        self.device = device
        self._lora: BatchLora | None = None
        self._key: tuple | None = None
        self._stacks: OrderedDict[tuple[tuple[int, float], ...], _Stack] = OrderedDict()

    def stack(self, adapters: list[LoraWeights | None]) -> BatchLora | None:
        """The adapters of a decode step, one entry of `adapters` per row.

        Rebuilt only when the batch's composition changes (a request joins or leaves), not every
        step; a batch whose rows all have one adapter uses its weights as they are."""
        key = tuple(a.key if a else None for a in adapters)
        if key == self._key:
            return self._lora
        present = sorted({a.key: a for a in adapters if a is not None}.values(), key=lambda a: a.key)
        lora: BatchLora | None = None
        if len(present) == 1 and None not in key:
            lora = present[0]
        elif present:
            lora = GroupedLora(present, adapters, self)
        self._lora, self._key = lora, key
        return lora

    def stacked(self, present: list[LoraWeights]) -> "_Stack":
        """The adapters in one zero-padded layout (GroupedLora's path without the kernel)."""
        keys = tuple(a.key for a in present)
        if keys not in self._stacks:
            self._stacks[keys] = _stack(present)
            if len(self._stacks) > 2:  # stacks are large: keep the current and the previous
                self._stacks.popitem(last=False)
        return self._stacks[keys]


def pack_lora(adapters: list[LoraWeights | None], lengths: list[int]) -> BatchLora | None:
    """The adapters of a prefill pack, one entry of `adapters` per prompt of `lengths` rows, in
    the pack's order: none, the one adapter every prompt has (its weights as they are), or a
    SegmentLora of the runs of rows that share one."""
    runs: list[tuple[int, int, LoraWeights]] = []
    start = 0
    for adapter, length in zip(adapters, lengths, strict=True):
        if adapter is not None:
            if runs and runs[-1][1] == start and runs[-1][2].key == adapter.key:
                runs[-1] = (runs[-1][0], start + length, adapter)  # the run goes on
            else:
                runs.append((start, start + length, adapter))
        start += length
    if not runs:
        return None
    if len(runs) == 1 and runs[0][:2] == (0, start):
        return runs[0][2]
    return SegmentLora(runs)


def _stack(adapters: list[LoraWeights]) -> _Stack:
    """The adapters in one zero-padded layout: projection p takes the widest rank any of them
    has for it, at the same columns in every adapter's A."""
    widths = {p: max(_width(a, p) for a in adapters) for members in INPUT_GROUPS.values() for p in members}
    cols: dict[str, tuple[int, int]] = {}
    for members in INPUT_GROUPS.values():
        start = 0
        for proj in (p for p in members if widths[p]):
            cols[proj] = (start, start + widths[proj])
            start += widths[proj]
    a_layers, b_layers = [], []
    for layer in range(len(adapters[0].a)):
        a_layers.append({})
        b_layers.append({})
        for group, members in INPUT_GROUPS.items():
            projections = [p for p in members if p in cols]
            if not projections:
                continue
            some = next(a for a in adapters if group in a.a[layer])
            inputs = some.a[layer][group].shape[0]
            outputs = {p: next(a.b[layer][p].shape[1] for a in adapters if p in a.cols) for p in projections}
            stacked_a = some.a[layer][group].new_zeros(len(adapters), inputs, cols[projections[-1]][1])
            for proj in projections:
                stacked_b = stacked_a.new_zeros(len(adapters), widths[proj], outputs[proj])
                for i, adapter in enumerate(adapters):
                    if proj in adapter.cols:
                        start, end = adapter.cols[proj]
                        column = cols[proj][0]
                        stacked_a[i, :, column : column + end - start] = adapter.a[layer][group][:, start:end]
                        stacked_b[i, : end - start] = adapter.b[layer][proj]
                b_layers[layer][proj] = stacked_b
            a_layers[layer][group] = stacked_a
    return _Stack(a=a_layers, b=b_layers, cols=cols)


def _width(adapter: LoraWeights, proj: str) -> int:
    if proj not in adapter.cols:
        return 0
    start, end = adapter.cols[proj]
    return end - start
