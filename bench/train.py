"""Benchmark: the train step against a bare cross-entropy step, and peak memory against sequence length and vocabulary.

    python bench/train.py [--model builtin:smollm2-135m-instruct] [--sequences 16] [--length 256]

(1) train-stage tokens/s (our Trainer: decoder forward, chunked LM head + top-k/tail JSD with
recompute, backward, AdamW) over a bare transformers step (model(input_ids, labels) cross-entropy,
backward, AdamW) on the same sequences, micro-batches and model; goal >= 0.90.
(2) peak memory of one training step for sequence lengths 512..4096 and vocabularies 49,152 and
151,936 (a 2-layer decoder, so the LM head dominates), next to a chunked cross-entropy baseline
(the same LM-head chunking with recompute, plain CE loss); goal <= 1.5x.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent

MEMORY_CODE = """
import numpy as np, torch
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
from transformers import LlamaConfig, LlamaForCausalLM
from rgsd_pipeline.config import TrainConfig
from rgsd_pipeline.examples import synthetic_example
from rgsd_pipeline.trainer import Trainer, World
torch.manual_seed(0)
V, T, MODE = {vocab}, {length}, "{mode}"
model = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                     max_position_embeddings=8192)).to(DEVICE)
rng = np.random.default_rng(0)
ids = rng.integers(0, V, T)
prompt = 32
positions = np.arange(T - prompt)
if MODE == "rgsd":
    example = synthetic_example(ids, prompt, rng.integers(0, V, (len(positions), 20)),
                                np.full((len(positions), 20), 0.04))
    trainer = Trainer(model, [example], TrainConfig(batch_size=1, micro_batch_size=1), World(), pad_id=0)
    trainer.step(0)
elif MODE == "chunked_ce":
    from torch.utils.checkpoint import checkpoint
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    hidden = model.get_decoder()(input_ids=torch.tensor([ids], device=DEVICE)).last_hidden_state[0, prompt - 1:-1]
    targets = torch.tensor(ids[prompt:], device=DEVICE)
    head = model.get_output_embeddings()
    def chunk_loss(h, t):
        return torch.nn.functional.cross_entropy(head(h).float(), t, reduction="sum")
    loss = sum(checkpoint(chunk_loss, hidden[i:i + 512], targets[i:i + 512], use_reentrant=False)
               for i in range(0, len(targets), 512)) / len(targets)
    loss.backward()
    optimizer.step()
if DEVICE == "cuda":
    print("CUDA_PEAK", torch.cuda.max_memory_allocated())
"""


def bytes_per_parameter(model_name: str) -> dict:
    """Training state per trainable parameter after two optimizer steps: weights + gradients + AdamW moments,
    counted from the tensors themselves, for a bf16 recipe with fp32 master weights (what `train` does) and for
    the same recipe trained in bf16 (what it did before master weights)."""
    import numpy as np
    import torch

    from rgsd_pipeline.checkpoints import load_student, write_checkpoint
    from rgsd_pipeline.config import load_config
    from rgsd_pipeline.examples import synthetic_example
    from rgsd_pipeline.models import resolve_model
    from rgsd_pipeline.trainer import Trainer, World
    from rgsd_pipeline.trainer_state import trainable

    path = resolve_model(model_name)
    rng = np.random.default_rng(0)
    out = {}
    for master in ("float32", "bfloat16"):
        config = load_config(ROOT / "configs" / "tiny.yaml", [f"model.path={model_name}", "model.dtype=bfloat16",
                                                              f"train.master_dtype={master}", "train.batch_size=2",
                                                              "train.micro_batch_size=2", "train.learning_rate=1e-6"])
        model = load_student(path, path, None, config)
        vocab = model.config.vocab_size
        examples = [synthetic_example(rng.integers(0, vocab, 64), 32, rng.integers(0, vocab, (32, 4)),
                                      np.full((32, 4), 0.2)) for _ in range(4)]
        trainer = Trainer(model, examples, config.train, World(), pad_id=0)
        for step in range(trainer.total_steps):
            trainer.step(step)
        params = list(trainable(model).values())
        count = sum(p.numel() for p in params)
        nbytes = lambda tensors: sum(t.numel() * t.element_size() for t in tensors)  # noqa: E731
        moments = [v for state in trainer.optimizer.state.values() for v in state.values()
                   if torch.is_tensor(v) and v.dim()]
        out[f"master {master}: weights"] = nbytes(params) / count
        out[f"master {master}: gradients"] = nbytes([p.grad for p in params]) / count
        out[f"master {master}: adamw moments"] = nbytes(moments) / count
        out[f"master {master}: total bytes per parameter"] = sum(out[f"master {master}: {k}"]
                                                                 for k in ("weights", "gradients", "adamw moments"))
        if master == "float32":
            with tempfile.TemporaryDirectory() as tmp:
                write_checkpoint(model, path, Path(tmp), config, {})
                size = (Path(tmp) / "model.safetensors").stat().st_size
                out["exported checkpoint file bytes per parameter"] = size / count
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--sequences", type=int, default=16)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--vocabs", type=int, nargs="+", default=[49152, 151936])
    parser.add_argument("--shape", default="", help="hidden,layers,vocab of a random model instead of --model")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast in both steps")
    parser.add_argument("--memory-only", action="store_true", help="only the peak-memory table")
    args = parser.parse_args()

    import numpy as np
    import torch
    from common import peak_memory_mb, record, timed

    from rgsd_pipeline.config import TrainConfig
    from rgsd_pipeline.examples import synthetic_example
    from rgsd_pipeline.models import load_model, resolve_model
    from rgsd_pipeline.trainer import Trainer, World, device

    def synchronize():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    if not args.memory_only:
        rng = np.random.default_rng(0)
        if args.shape:  # a random model of a given shape: "hidden,layers,vocab"
            from transformers import LlamaConfig, LlamaForCausalLM

            hidden, layers, vocab = map(int, args.shape.split(","))
            shape = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 4,
                                num_hidden_layers=layers,
                                num_attention_heads=hidden // 64, num_key_value_heads=2, head_dim=64)
            new_model = lambda: LlamaForCausalLM(shape)  # noqa: E731
            name = f"random Llama hidden {hidden}, {layers} layers, vocab {vocab}"
        else:
            path = resolve_model(args.model)
            new_model = lambda: load_model(path)  # noqa: E731
            vocab, name = new_model().config.vocab_size, args.model
        prompt = 48
        examples = []
        for _ in range(args.sequences):
            ids = rng.integers(0, vocab, args.length)
            positions = np.arange(args.length - prompt)
            examples.append(synthetic_example(ids, prompt, rng.integers(0, vocab, (len(positions), 20)),
                                              np.full((len(positions), 20), 0.04)))
        config = TrainConfig(batch_size=8, micro_batch_size=4, learning_rate=1e-6, clip="none", bf16=args.bf16)
        tokens = sum(len(e.input_ids) for e in examples)

        trainer = Trainer(new_model(), examples, config, World(), pad_id=0)
        batches = trainer.batches
        trainer.step(0)  # warm-up
        def our_steps():
            for step in range(trainer.total_steps):
                trainer.step(step)
            synchronize()

        _, ours_s = timed(our_steps)
        trainer = None  # free its model and optimizer before the baseline's

        model = new_model().to(device())
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)

        def bare_steps(batches):
            for batch in batches:
                optimizer.zero_grad()
                for lo in range(0, len(batch), config.micro_batch_size):
                    micro = batch[lo:lo + config.micro_batch_size]
                    ids = torch.tensor(np.stack([examples[i].input_ids for i in micro]),
                                       device=device())
                    labels = ids.clone()
                    labels[:, :prompt] = -100
                    with torch.autocast(device().type, dtype=torch.bfloat16, enabled=args.bf16):
                        loss = model(input_ids=ids, labels=labels).loss
                    loss.backward()
                optimizer.step()
            synchronize()

        bare_steps(batches[:1])  # warm-up
        _, bare_s = timed(lambda: bare_steps(batches))
        record(f"train {name} on {device().type}", {"stage_tokens_per_s": tokens / ours_s,
                                                    "bare_ce_tokens_per_s": tokens / bare_s,
                                       "stage_over_bare_ce": bare_s / ours_s, "sequences": args.sequences,
                                       "length": args.length})

    record(f"train bytes per parameter ({args.model}, model.dtype bfloat16)", bytes_per_parameter(args.model))

    memory = {}
    for vocab_size in args.vocabs:
        for length in args.lengths:
            ours = peak_memory_mb(MEMORY_CODE.format(vocab=vocab_size, length=length, mode="rgsd"))
            baseline = peak_memory_mb(MEMORY_CODE.format(vocab=vocab_size, length=length, mode="chunked_ce"))
            memory[f"V{vocab_size}_T{length}_rgsd_mb"] = ours
            memory[f"V{vocab_size}_T{length}_chunked_ce_mb"] = baseline
            memory[f"V{vocab_size}_T{length}_ratio"] = ours / baseline
    record(f"train peak memory on {device().type} (2-layer decoder, one sequence)", memory)


if __name__ == "__main__":
    main()
