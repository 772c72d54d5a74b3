"""Built-in models: deterministic, loadable by transformers, generating; safe loading rules."""

import shutil

import pytest
import torch

from rgsd_pipeline.fingerprints import WEIGHTS_RECORD, model_fingerprint, weight_hashes
from rgsd_pipeline.hub import HubError
from rgsd_pipeline.models import ModelError, build_tiny_tokenizer, check_weights_format, load_model, resolve_model
from rgsd_pipeline.render import chat_ids
from rgsd_pipeline.shards import sha256_file


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
    with pytest.raises(HubError, match="not in the Hub cache .* hf download rgsd-test/absent --revision main"):
        resolve_model("rgsd-test/absent")  # a Hub id, offline (tests/test_hub.py: from a pre-filled cache)
    with pytest.raises(ModelError, match="nor a Hub id"):
        resolve_model(str(tmp_path / "no" / "such" / "folder"))
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_path, pickled, ignore=shutil.ignore_patterns("*.safetensors"))
    (pickled / "pytorch_model.bin").write_bytes(b"not really")
    with pytest.raises(ModelError, match="only pickle weights"):
        check_weights_format(pickled, allow_pickle=False)
    check_weights_format(pickled, allow_pickle=True)


def test_fingerprint_sees_a_changed_chat_template(tiny_path, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_path, copy, ignore=shutil.ignore_patterns(WEIGHTS_RECORD))  # a folder of the user's
    assert model_fingerprint(copy) == model_fingerprint(tiny_path)
    (copy / "chat_template.jinja").write_text("{{ messages }}")
    assert model_fingerprint(copy) != model_fingerprint(tiny_path)


def test_fingerprint_sees_the_weights_bytes_not_only_headers_and_sizes(tiny_path, tmp_path, monkeypatch):
    """A retrained checkpoint has its base's safetensors header and size; only the bytes tell them apart."""
    from safetensors.torch import load_file, save_file

    monkeypatch.setenv("RGSD_CACHE_DIR", str(tmp_path / "cache"))
    retrained = tmp_path / "retrained"
    shutil.copytree(tiny_path, retrained, ignore=shutil.ignore_patterns(WEIGHTS_RECORD))
    weights = load_file(tiny_path / "model.safetensors")
    name = next(iter(weights))
    weights[name] = weights[name] + 7e-5
    save_file(weights, retrained / "model.safetensors", metadata={"format": "pt"})
    assert (retrained / "model.safetensors").stat().st_size == (tiny_path / "model.safetensors").stat().st_size
    assert model_fingerprint(retrained) != model_fingerprint(tiny_path)
    # An external folder is hashed once, then its digest comes from the cache while size and mtime hold.
    assert weight_hashes(retrained) == {"model.safetensors": sha256_file(retrained / "model.safetensors")}
    assert len(list((tmp_path / "cache" / "weight-hashes").iterdir())) == 1
    monkeypatch.setattr("rgsd_pipeline.fingerprints.sha256_file", lambda path: pytest.fail("hashed twice"))
    model_fingerprint(retrained)


def test_a_folder_we_wrote_is_verified_against_its_record(tiny_path, tmp_path, monkeypatch):
    """A changed byte, a file swapped in with the recorded mtime, a file added or removed: each refused by name. A
    copy of the folder (new ctime) is hashed once and accepted."""
    import os

    from rgsd_pipeline.shards import ArtifactError

    monkeypatch.setenv("RGSD_CACHE_DIR", str(tmp_path / "cache"))
    copy = tmp_path / "copy"
    shutil.copytree(tiny_path, copy)  # copies rgsd-weights.json, keeps mtimes (copy2), new ctimes: hashed once
    assert (copy / WEIGHTS_RECORD).exists() and model_fingerprint(copy) == model_fingerprint(tiny_path)
    monkeypatch.setattr("rgsd_pipeline.fingerprints.sha256_file", lambda path: pytest.fail(f"{path} hashed again")
                        if path.suffix == ".safetensors" else sha256_file(path))
    model_fingerprint(copy)
    monkeypatch.undo()
    monkeypatch.setenv("RGSD_CACHE_DIR", str(tmp_path / "cache"))
    weights = copy / "model.safetensors"
    stat = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # the last byte of the last tensor
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size and mtime: only ctime tells
    with pytest.raises(ArtifactError, match=f"{weights} does not hold what was written there"):
        model_fingerprint(copy)
    shutil.copy2(tiny_path / "model.safetensors", weights)
    model_fingerprint(copy)  # the original bytes again: accepted
    (copy / "model-extra.safetensors").write_bytes(b"")
    with pytest.raises(ArtifactError, match="model-extra.safetensors was not written there"):
        model_fingerprint(copy)
    (copy / "model-extra.safetensors").unlink()
    (copy / "generation_config.json").unlink()
    with pytest.raises(ArtifactError, match="generation_config.json is missing"):
        model_fingerprint(copy)


def test_weights_of_another_architecture_are_refused_naming_the_tensors(tiny_path, tmp_path):
    """tiny-qwen2's tensors (q/k/v biases, no lm_head: tied) in a folder whose config is the tiny Llama's."""
    from rgsd_pipeline.models import ModelError, load_model, resolve_model

    mixed = tmp_path / "mixed"
    shutil.copytree(tiny_path, mixed, ignore=shutil.ignore_patterns(WEIGHTS_RECORD))
    shutil.copy(resolve_model("builtin:tiny-qwen2") / "model.safetensors", mixed / "model.safetensors")
    with pytest.raises(ModelError) as refused:
        load_model(mixed)
    message = str(refused.value)
    assert "missing: lm_head.weight" in message and "unexpected: model.layers.0.self_attn.k_proj.bias" in message
    load_model(tiny_path)  # its own weights load


def test_a_tokenizer_is_loaded_once_per_process_for_equal_files(tiny_path, tmp_path):
    """A run's checkpoints carry their base's tokenizer files: one object serves them all; a checkpoint whose chat
    template differs gets its own."""
    import json

    from rgsd_pipeline.models import load_tokenizer

    same, changed = tmp_path / "same", tmp_path / "changed"
    for copy in (same, changed):
        shutil.copytree(tiny_path, copy)
    config = json.loads((changed / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (changed / "tokenizer_config.json").write_text(json.dumps(config))
    (changed / "chat_template.jinja").unlink(missing_ok=True)
    assert load_tokenizer(same) is load_tokenizer(tiny_path)
    other = load_tokenizer(changed)
    assert other is not load_tokenizer(tiny_path)
    assert other.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "hi"
