"""One epoch of TRL's SDFTTrainer on a run's training prompts, as our peer in bench/trl_compare.py.

    .venv-bench/bin/python bench/trl_sdft.py --run runs/x --out /tmp/trl

Runs in the bench environment (`make bench` layers `trl` over .venv in .venv-bench), never in .venv.
The rubric is the privileged context, written with the run's own teacher template; the teacher is the
frozen base model (`teacher_model_kind="base"`), one sample per prompt, top-k JSD(β) with a tail
bucket; batch size, steps, generation length, temperature and learning rate are the run's.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    import polars as pl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.sdft import SDFTConfig, SDFTTrainer

    from rgsd_pipeline import layout
    from rgsd_pipeline.models import resolve_model
    from rgsd_pipeline.recipe import load_run_config
    from rgsd_pipeline.render import format_criteria
    from rgsd_pipeline.shards import read_stage
    from schemas import PROMPTS

    config = load_run_config(args.run)
    prompts = read_stage(layout.prompts_dir(args.run), PROMPTS).lazy().filter(pl.col("split") == "train").collect()
    rows = prompts.to_dicts()
    dataset = Dataset.from_list([{"prompt": r["messages"],
                                  "privileged_context": format_criteria(r["rubric"], config.template)} for r in rows])
    template = (config.template.rubric_template.replace("{question}", "{prompt}")
                .replace("{criteria}", "{privileged_context}"))
    path = str(resolve_model(config.model))
    train = config.train
    steps = -(-len(rows) // train.batch_size)
    sdft = SDFTConfig(
        output_dir=args.out, use_cpu=True, report_to=[], save_strategy="no", logging_steps=1, seed=config.seed,
        per_device_train_batch_size=train.micro_batch_size,
        gradient_accumulation_steps=train.batch_size // train.micro_batch_size,
        max_steps=steps, learning_rate=train.learning_rate, warmup_steps=train.warmup_steps,
        lr_scheduler_type="constant_with_warmup",
        max_grad_norm=train.max_grad_norm, num_generations=1, max_completion_length=config.rollout.max_new_tokens,
        temperature=config.rollout.temperature, top_p=config.rollout.top_p, top_k=config.rollout.top_k,
        max_prompt_length=config.data.max_prompt_tokens, teacher_model_kind="base", teacher_prompt_template=template,
        distillation_mode="topk_logits", distillation_topk=config.score.top_k, distillation_alpha=train.beta,
        distillation_add_tail=True, remove_unused_columns=False, dataloader_num_workers=0,
        gradient_checkpointing=False, bf16=False,
    )
    model = AutoModelForCausalLM.from_pretrained(path, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(path)
    trainer = SDFTTrainer(model=model, args=sdft, train_dataset=dataset, processing_class=tokenizer)
    seconds = {"generation": 0.0, "steps": 0.0}

    def timed(name, method):
        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                seconds[name] += time.perf_counter() - started
        return wrapper

    trainer._generate = timed("generation", trainer._generate)  # inside training_step: subtracted below
    trainer.training_step = timed("steps", trainer.training_step)
    trainer.train()
    print(f"TRL_STEPS {trainer.state.global_step}")
    print(f"TRL_SECONDS generation={seconds['generation']:.2f} teacher_and_update="
          f"{seconds['steps'] - seconds['generation']:.2f}")


if __name__ == "__main__":
    main()
