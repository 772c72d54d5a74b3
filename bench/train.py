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

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MEMORY_CODE = """
import numpy as np, torch
from transformers import LlamaConfig, LlamaForCausalLM
from rgsd_pipeline.config import TrainConfig
from rgsd_pipeline.examples import Example
from rgsd_pipeline.trainer import Trainer, World
torch.manual_seed(0)
V, T, MODE = {vocab}, {length}, "{mode}"
model = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=8192))
rng = np.random.default_rng(0)
ids = rng.integers(0, V, T)
prompt = 32
positions = np.arange(T - prompt)
if MODE == "rgsd":
    example = Example(ids, prompt, positions, rng.integers(0, V, (len(positions), 20)),
                      np.log(np.full((len(positions), 20), 0.04, np.float32)), np.full(len(positions), -3.0, np.float32))
    trainer = Trainer(model, [example], TrainConfig(batch_size=1, micro_batch_size=1), World(), pad_id=0)
    trainer.step(0)
elif MODE == "chunked_ce":
    from torch.utils.checkpoint import checkpoint
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    hidden = model.get_decoder()(input_ids=torch.tensor([ids])).last_hidden_state[0, prompt - 1:-1]
    targets = torch.tensor(ids[prompt:])
    head = model.get_output_embeddings()
    def chunk_loss(h, t):
        return torch.nn.functional.cross_entropy(head(h).float(), t, reduction="sum")
    loss = sum(checkpoint(chunk_loss, hidden[i:i + 512], targets[i:i + 512], use_reentrant=False)
               for i in range(0, len(targets), 512)) / len(targets)
    loss.backward()
    optimizer.step()
"""


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--sequences", type=int, default=16)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--vocabs", type=int, nargs="+", default=[49152, 151936])
    args = parser.parse_args()

    import numpy as np
    import torch
    from common import peak_rss_mb, record, timed

    from rgsd_pipeline.config import TrainConfig
    from rgsd_pipeline.examples import Example
    from rgsd_pipeline.models import load_model, resolve_model
    from rgsd_pipeline.trainer import Trainer, World

    path = resolve_model(args.model)
    rng = np.random.default_rng(0)
    vocab = load_model(path).config.vocab_size
    prompt = 48
    examples = []
    for _ in range(args.sequences):
        ids = rng.integers(0, vocab, args.length)
        positions = np.arange(args.length - prompt)
        examples.append(Example(ids, prompt, positions, rng.integers(0, vocab, (len(positions), 20)),
                                np.log(np.full((len(positions), 20), 0.04, np.float32)),
                                np.full(len(positions), -3.0, np.float32)))
    config = TrainConfig(batch_size=8, micro_batch_size=4, learning_rate=1e-6, clip="none")
    tokens = sum(len(e.input_ids) for e in examples)

    trainer = Trainer(load_model(path), examples, config, World(), pad_id=0)
    trainer.step(0)  # warm-up
    _, ours_s = timed(lambda: [trainer.step(s) for s in range(trainer.total_steps)])

    model = load_model(path)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)

    def bare_steps(batches):
        for batch in batches:
            optimizer.zero_grad()
            for lo in range(0, len(batch), config.micro_batch_size):
                ids = torch.tensor(np.stack([examples[i].input_ids for i in batch[lo:lo + config.micro_batch_size]]))
                labels = ids.clone()
                labels[:, :prompt] = -100
                model(input_ids=ids, labels=labels).loss.backward()
            optimizer.step()

    bare_steps(trainer.batches[:1])  # warm-up
    _, bare_s = timed(lambda: bare_steps(trainer.batches))
    record(f"train {args.model}", {"stage_tokens_per_s": tokens / ours_s, "bare_ce_tokens_per_s": tokens / bare_s,
                                   "stage_over_bare_ce": bare_s / ours_s, "sequences": args.sequences,
                                   "length": args.length})

    memory = {}
    for vocab_size in args.vocabs:
        for length in args.lengths:
            ours = peak_rss_mb(MEMORY_CODE.format(vocab=vocab_size, length=length, mode="rgsd"))
            baseline = peak_rss_mb(MEMORY_CODE.format(vocab=vocab_size, length=length, mode="chunked_ce"))
            memory[f"V{vocab_size}_T{length}_rgsd_mb"] = ours
            memory[f"V{vocab_size}_T{length}_chunked_ce_mb"] = baseline
            memory[f"V{vocab_size}_T{length}_ratio"] = ours / baseline
    record("train peak memory (2-layer decoder, one sequence)", memory)


if __name__ == "__main__":
    main()
