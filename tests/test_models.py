"""Built-in models: deterministic, loadable by transformers, generating; safe loading rules."""

import shutil

import pytest
import torch

from rgsd_pipeline.models import (
    ModelError,
    build_tiny_tokenizer,
    check_weights_format,
    load_model,
    model_fingerprint,
    resolve_model,
)
from rgsd_pipeline.render import chat_ids


def test_tiny_model_loads_and_generates(tiny_path, tiny_tokenizer):
    model = load_model(tiny_path)
    assert model.config.head_dim == 64 and model.config.vocab_size == len(tiny_tokenizer)
    ids = chat_ids(tiny_tokenizer, [{"role": "user", "content": "What is a vaccine?"}])
    text = tiny_tokenizer.decode(ids)
    assert text.startswith("<|im_start|>user\nWhat is a vaccine?<|im_end|>\n")
    assert text.endswith("<|im_start|>assistant\n")
    torch.manual_seed(0)
    out = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=True, min_new_tokens=8)
    assert out.shape == (1, len(ids) + 8)
    assert tiny_tokenizer.decode(tiny_tokenizer.encode("Hypertension, café")) == "Hypertension, café"


def test_tiny_build_is_deterministic(tiny_path, tmp_path, monkeypatch):
    monkeypatch.setenv("RGSD_CACHE_DIR", str(tmp_path))
    rebuilt = resolve_model("builtin:tiny")
    assert rebuilt != tiny_path and model_fingerprint(rebuilt) == model_fingerprint(tiny_path)
    assert (rebuilt / "model.safetensors").read_bytes() == (tiny_path / "model.safetensors").read_bytes()
    assert build_tiny_tokenizer().get_vocab() == build_tiny_tokenizer().get_vocab()


def test_tiny_qwen2_variant(model_cache):
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(resolve_model("builtin:tiny-qwen2")).model_type == "qwen2"


def test_model_names_and_weight_formats(tiny_path, tmp_path):
    with pytest.raises(ModelError, match="unknown built-in model"):
        resolve_model("builtin:gpt-9")
    with pytest.raises(ModelError, match="never downloaded"):
        resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_path, pickled, ignore=shutil.ignore_patterns("*.safetensors"))
    (pickled / "pytorch_model.bin").write_bytes(b"not really")
    with pytest.raises(ModelError, match="only pickle weights"):
        check_weights_format(pickled, allow_pickle=False)
    check_weights_format(pickled, allow_pickle=True)


def test_fingerprint_sees_a_changed_chat_template(tiny_path, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_path, copy)
    assert model_fingerprint(copy) == model_fingerprint(tiny_path)
    (copy / "chat_template.jinja").write_text("{{ messages }}")
    assert model_fingerprint(copy) != model_fingerprint(tiny_path)
