import time

import gguf
import pytest
import torch

from agent.base_model import EMBEDDED_CACHE_NAME, EMBEDDED_MODEL_ID, load_base_model, load_tokenizer, publish_dir
from agent.drafting import Drafter
from agent.prompt import IncomingEmail
from core.settings import Settings


def test_embedded_model_drafts_a_sensible_reply(embedded_model, model_settings):
    assert embedded_model.model_id == EMBEDDED_MODEL_ID
    assert not embedded_model.model.training
    email = IncomingEmail(
        sender="alice@example.com",
        subject="Order #4411 not delivered",
        body="Hi,\n\nMy order #4411 was due last Friday but has not arrived. Where is it?\n\nThanks,\nAlice",
    )
    result = Drafter.local(embedded_model, model_settings).draft("", email)
    assert result.finish_reason == "stop"
    assert 5 < result.tokens_generated < model_settings.max_new_tokens
    assert "order" in result.text.lower() or "4411" in result.text
    assert "<|" not in result.text


def test_second_load_comes_from_the_cache_with_the_gguf_weights(embedded_model, model_settings):
    assert [p.name for p in model_settings.model_cache_dir.iterdir()] == [EMBEDDED_CACHE_NAME]  # no temp leftovers
    started = time.perf_counter()
    again = load_base_model(model_settings)
    assert time.perf_counter() - started < 5  # the GGUF conversion takes 12+ s
    first, second = embedded_model.model.state_dict(), again.model.state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)

    gguf_tensors = {t.name: t for t in gguf.GGUFReader(_gguf_path()).tensors}
    for gguf_name, name in [
        ("token_embd.weight", "model.embed_tokens.weight"),
        ("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight"),
    ]:
        tensor = gguf_tensors[gguf_name]
        expected = torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type))
        assert torch.equal(second[name], expected), name


def test_tokenizer_comes_from_the_cache_with_its_chat_template(model_settings):
    tokenizer = load_tokenizer(model_settings)
    assert tokenizer.eos_token == "<|im_end|>"
    assert "<|im_start|>" in tokenizer.chat_template


def test_local_folder_base_model(tiny_model, tmp_path):
    folder = tmp_path / "tiny"
    tiny_model.model.save_pretrained(folder)
    tiny_model.tokenizer.save_pretrained(folder)
    loaded = load_base_model(Settings(var_dir=tmp_path, base_model=str(folder), model_dtype="bfloat16"))
    assert loaded.model_id == str(folder)
    assert loaded.model.dtype == torch.bfloat16
    assert not loaded.model.training
    assert len(loaded.tokenizer) == len(tiny_model.tokenizer)


def test_unknown_base_model_is_never_downloaded(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(ValueError, match="never downloaded"):
        load_base_model(Settings(var_dir=tmp_path, base_model="no-such-org/no-such-model"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_4bit_needs_a_gpu(tmp_path, model_settings):
    with pytest.raises(ValueError, match="needs a GPU"):
        load_base_model(model_settings.model_copy(update={"load_in_4bit": True}))


def test_publish_dir_keeps_the_first_complete_copy(tmp_path):
    folder = tmp_path / "model"
    for writer in ("first", "second"):
        tmp = tmp_path / f".tmp-{writer}"
        tmp.mkdir()
        (tmp / "weights").write_text(writer)
        publish_dir(tmp, folder)
        assert not tmp.exists()
    assert (folder / "weights").read_text() == "first"


def _gguf_path() -> str:
    import importlib.util

    from agent.base_model import EMBEDDED_GGUF_FILE, EMBEDDED_PACKAGE

    return f"{importlib.util.find_spec(EMBEDDED_PACKAGE).submodule_search_locations[0]}/{EMBEDDED_GGUF_FILE}"
