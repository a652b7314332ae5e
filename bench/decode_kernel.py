"""The C kernel of decode steps (agent/decode_kernel.py) against PyTorch on the same work, the
embedded model's shapes in float32:

- products: the 121 weights a decode step reads (30 layers' fused q/k/v, o, gate/up, down, and
  the LM head), each once per pass so that they come from memory as in a step, for 1-16 rows:
  float32 by the kernel and by each of PyTorch's products (F.linear, the weight's halves on the
  right or the left: agent/weights.py), int8 by the kernel (packed) and by PyTorch's weight-only
  int8 kernel (bfloat16 rows, as agent/weights.py calls it); GB/s of weights read;
- attention of one layer (RoPE, the cache writes, attention over 241 positions), us per call, by the kernel
  and by the PyTorch path of agent/kv_cache.py, for 1 and 16 rows;
- the residual add and RMSNorm by the kernel and by PyTorch's ops.
Median of RUNS passes, the alternatives alternated (bench.prefill.median_ms); the memory
bandwidth of the same run (a 1 GiB sum) beside them.

Run: .venv/bin/python -m bench.decode_kernel   (about 2 minutes on 2 CPU cores)
"""

import torch
import torch.nn.functional as F

from agent import decode_kernel
from agent import weights as weight_formats
from agent.base_model import load_base_model
from agent.kv_cache import KVCache
from agent.llama import Llama
from agent.threads import in_fresh_thread
from bench.decode import bandwidth_gb_s
from bench.prefill import median_ms
from bench.report import save
from core.settings import Settings

ROWS = (1, 2, 4, 8, 16)
POSITION = 240
RUNS = 9


@torch.inference_mode()
def products(figures: dict) -> None:
    model = load_base_model(Settings(model_dtype="float32")).model
    formats = {name: Llama(model, 512, name) for name in ("float", "int8")}

    def held(llama: Llama) -> list:
        return [w for layer in llama.layers for w in (layer.qkv, layer.o, layer.gate_up, layer.down)] + [llama.lm_head]

    floats, int8s = held(formats["float"]), held(formats["int8"])
    nbytes = {"float32": sum(w.nbytes for w in floats), "int8": sum(w.nbytes for w in int8s)}
    figures["weight_mb_per_step"] = {name: round(n / 1e6, 1) for name, n in nbytes.items()}
    figures["products_ms"], figures["products_gb_s"] = {}, {}
    unpacked = {id(w): _unpacked(w) for w in int8s}
    for rows in ROWS:
        xs = {n: torch.randn(rows, n) for n in {w.full.shape[1] for w in floats}}

        def every(product, weights, to=torch.float32, xs=xs):
            inputs = {n: x.to(to) for n, x in xs.items()}
            return lambda: [product(w, inputs[w.full.shape[1]]) for w in weights]

        works = {f"float32 {name}": every(p, floats) for name, p in weight_formats.PRODUCTS.items()}
        works["int8 kernel"] = every(lambda w, x: w.matmul(x), int8s)
        works["int8 pytorch"] = every(  # PyTorch's weight-only kernel on the same codes, as it takes them
            lambda w, x: torch.ops.aten._weight_int8pack_mm(x, *unpacked[id(w)]), int8s, torch.bfloat16
        )
        ms = median_ms(works, RUNS)
        figures["products_ms"][rows] = ms
        figures["products_gb_s"][rows] = {
            name: round(nbytes[name.split()[0]] / (t / 1000) / 1e9, 1) for name, t in ms.items()
        }
        print("products, rows", rows, ms, flush=True)

    llama = formats["float"]
    figures["attention_us"] = {}
    for rows in (1, 16):
        positions = torch.full((rows,), POSITION)
        qkv = torch.randn(rows, llama.q_size + 2 * llama.kv_size)
        cache = KVCache(llama, 16, 512)
        by_kernel = cache.decode_attention(positions, POSITION + 1)
        takes = decode_kernel.takes_attention
        decode_kernel.takes_attention = lambda cache, head_dim: False
        by_pytorch = cache.decode_attention(positions, POSITION + 1)
        decode_kernel.takes_attention = takes
        works = {"kernel": lambda a=by_kernel, q=qkv: a(0, q), "pytorch": lambda a=by_pytorch, q=qkv: a(0, q)}
        figures["attention_us"][rows] = _median_us(works)
        print("attention of one layer, rows", rows, figures["attention_us"][rows], flush=True)

    x, out, weight = torch.randn(1, 576), torch.randn(1, 576), torch.randn(576)
    works = {
        "kernel": lambda: decode_kernel.add_rms_norm(x.clone(), out, weight, 1e-5),
        "pytorch": lambda: F.rms_norm(x.clone() + out, weight.shape, weight, 1e-5),
    }
    figures["add_rms_norm_us"] = _median_us(works)
    print("residual add and norm, one row", figures["add_rms_norm_us"], flush=True)


def _median_us(works: dict, calls: int = 200) -> dict[str, float]:
    """Each work's median time per call in us, over RUNS runs of `calls` calls, alternated."""
    ms = median_ms({name: lambda w=work: [w() for _ in range(calls)] for name, work in works.items()}, RUNS)
    return {name: round(t * 1000 / calls, 1) for name, t in ms.items()}


def _unpacked(weight) -> tuple:
    """The int8 codes [out, in] and bfloat16 scales of a weight the kernel holds packed."""
    out = weight.full.shape[0]
    return weight.packed.transpose(1, 2).reshape(out, -1), weight.scale.to(torch.bfloat16)


def main() -> None:
    figures = {"bandwidth_gb_s": round(in_fresh_thread(bandwidth_gb_s), 1), "dtype": "float32"}
    in_fresh_thread(products, figures)
    save("decode-kernel", figures)


if __name__ == "__main__":
    main()
