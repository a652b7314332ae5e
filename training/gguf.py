"""The `gguf` export format: the merged model as one GGUF file for llama.cpp and Ollama, as
llama.cpp's convert_hf_to_gguf writes one, with an Ollama `Modelfile` beside it. training/export.py
imports this module only when it writes the format, so the API never loads the `gguf` package."""

import hashlib
import json
from pathlib import Path

import gguf
import numpy as np

from agent.prompt import END_OF_TURN, pad_token_id
from core.errors import Invalid
from core.settings import Settings
from training.export import Merged
from training.models import GgufDtype

MODELFILE = "Modelfile"
# The pre-tokenizer llama.cpp needs is named in the file, not derivable from it: GGUF export
# knows SmolLM2's vocabulary (the embedded base's, and the test models'), by this hash of its tokens.
GGUF_PRE_TOKENIZERS = {"d1f2ce856b324081b621d9e2e8dbd22879f462329f3fd4aa39fa758dddb2ce55": "smollm"}


def write_gguf_folder(
    merged: Merged, folder: Path, name: str, instructions: str, settings: Settings, *, dtype: GgufDtype
) -> None:
    """The GGUF file of the merged model in `folder`, and the Modelfile that runs it in Ollama."""
    file_name = gguf_file_name(name, dtype)
    write_gguf(merged, folder / file_name, dtype=dtype, name=name)
    (folder / MODELFILE).write_text(modelfile(file_name, instructions, settings))


def gguf_file_name(name: str, dtype: GgufDtype) -> str:
    return f"{name}-{'f16' if dtype == GgufDtype.float16 else 'f32'}.gguf"


def write_gguf(merged: Merged, path: Path, *, dtype: GgufDtype, name: str) -> None:
    """The merged Llama as llama.cpp's convert_hf_to_gguf writes one: its hyper-parameter keys, the
    tensors under GGUF's names (Q and K rows permuted into llama.cpp's rotary layout; norms kept
    in float32), the byte-level BPE tokenizer and the chat template."""
    model, tokenizer = merged.model, merged.tokenizer
    config = model.config
    rope = config.rope_parameters or {}
    if config.model_type != "llama" or rope.get("rope_type", "default") != "default":
        raise Invalid(f"GGUF export writes Llama models with plain RoPE, not {config.model_type} ({rope})")
    if config.attention_bias or config.mlp_bias:
        raise Invalid("GGUF export writes Llama models without attention or MLP biases")
    tokens, token_types, merges = _gguf_vocabulary(tokenizer, config.vocab_size)
    pre = GGUF_PRE_TOKENIZERS.get(hashlib.sha256("\n".join(tokens[: len(tokenizer)]).encode()).hexdigest())
    if pre is None:
        raise Invalid(
            "GGUF export knows the pre-tokenizer of SmolLM2's vocabulary only, and this base has another: export "
            "the merged format and convert it with llama.cpp's convert_hf_to_gguf.py"
        )
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    float_type, file_type = {
        GgufDtype.float16: (np.float16, gguf.LlamaFileType.MOSTLY_F16),
        GgufDtype.float32: (np.float32, gguf.LlamaFileType.ALL_F32),
    }[dtype]

    writer = gguf.GGUFWriter(path, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_name(name)
    writer.add_file_type(file_type)
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(rope.get("rope_theta", 10000.0))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(merges)
    for add, token_id in (
        (writer.add_bos_token_id, tokenizer.bos_token_id),
        (writer.add_eos_token_id, tokenizer.eos_token_id),
        (writer.add_unk_token_id, tokenizer.unk_token_id),
        (writer.add_pad_token_id, pad_token_id(tokenizer)),
    ):
        if token_id is not None:
            add(token_id)
    writer.add_add_bos_token(False)  # the chat template opens every turn itself; draftloop adds nothing
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(False)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp reads the output projection from token_embd when it is absent
        gguf_name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise Invalid(f"GGUF export has no name for the weight {key}")
        data = tensor.detach().float().numpy()
        if gguf_name.endswith(("attn_q.weight", "attn_k.weight")):
            data = _rotary_permute(data, heads if gguf_name.endswith("attn_q.weight") else kv_heads)
        writer.add_tensor(gguf_name, data.astype(float_type if data.ndim > 1 else np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _rotary_permute(weights, heads: int):
    """llama.cpp's layout of a Q or K projection (convert_hf_to_gguf's LlamaModel.permute): within
    each head, the rows of the two rotary halves interleaved. transformers' GGUF loader undoes it."""
    return (
        weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _gguf_vocabulary(tokenizer, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """Tokens by id (padded to the model's vocabulary as convert_hf_to_gguf pads), their llama.cpp
    types (special added tokens are control tokens) and the BPE merges."""
    by_id = {token_id: token for token, token_id in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for token_id in range(vocab_size):
        if token_id not in by_id:
            tokens.append(f"[PAD{token_id}]")
            types.append(gguf.TokenType.UNUSED)
        elif token_id in added:
            tokens.append(by_id[token_id])
            types.append(gguf.TokenType.CONTROL if added[token_id].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[token_id])
            types.append(gguf.TokenType.NORMAL)
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    if model["type"] != "BPE":
        raise Invalid(f"GGUF export writes byte-level BPE tokenizers, not {model['type']}")
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in model["merges"]]
    return tokens, types, merges


def modelfile(gguf_name: str, instructions: str, settings: Settings) -> str:
    """Ollama's recipe for the GGUF: ChatML as the chat template writes it, the tenant's
    instructions as the system prompt, and draftloop's decoding: greedy, the reply length, the
    repetition penalty over the whole context it is given, stopping at the end of the turn.
    Ollama has no no_repeat_ngram_size; the cycle stop is draftloop's own."""
    system = instructions.replace('"""', "'''")  # a Modelfile's triple-quoted string cannot hold """
    return (
        f"FROM ./{gguf_name}\n"
        'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}\n'
        f"{{{{ .Content }}}}{END_OF_TURN}\n"
        '{{ end }}<|im_start|>assistant\n"""\n'
        f'SYSTEM """{system}"""\n'
        f'PARAMETER stop "{END_OF_TURN}"\n'
        "PARAMETER temperature 0\n"
        f"PARAMETER num_predict {settings.max_new_tokens}\n"
        f"PARAMETER num_ctx {settings.max_prompt_tokens + settings.max_new_tokens}\n"
        f"PARAMETER repeat_penalty {settings.repetition_penalty:g}\n"
        "PARAMETER repeat_last_n -1\n"
    )
