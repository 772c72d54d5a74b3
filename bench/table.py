"""Print the ratios in bench/results.json as one table, each beside its goal.

    python bench/table.py
"""

from __future__ import annotations

import json

from common import RESULTS

# (section prefix, key, what it measures, goal text, goal test)
ROWS = [
    ("rollout", "hf_stage_over_bare", "rollout stage / bare HF generate (tokens/s)", ">= 0.95", lambda v: v >= 0.95),
    ("rollout", "vllm_stage_over_bare", "rollout stage / bare vLLM generate (tokens/s)", ">= 0.95",
     lambda v: v >= 0.95),
    ("rollout", "vllm_over_hf", "vLLM / HF generation (tokens/s)", ">= 2.5", lambda v: v >= 2.5),
    ("rollout", "vllm_over_hf_demo_sampling", "vLLM / HF generation, the demo's sampling and length (tokens/s)",
     ">= 2.5", lambda v: v >= 2.5),
    ("demo rollout", "vllm_over_hf", "vLLM / HF, the demo's rollout as configured (tokens/s)", "-", None),
    ("score", "stage_over_bare_forward", "score stage / bare forward pass (tokens/s)", ">= 0.95", lambda v: v >= 0.95),
    ("score", "vllm_over_hf", "vLLM / HF scoring (tokens/s)", "-", None),
    ("score", "bytes_per_topk_entry", "signals bytes per (token, k) entry", "< 6", lambda v: v < 6),
    ("score peak memory", "chunked_over_full_above_baseline", "scoring memory, chunked / full logits", "< 0.5",
     lambda v: v < 0.5),
    ("train", "stage_over_bare_ce", "train stage / bare CE step (tokens/s)", ">= 0.95", lambda v: v >= 0.95),
    ("train bytes per parameter", "master float32: total bytes per parameter",
     "training state, bytes per parameter (fp32 master, AdamW)", "-", None),
    ("fingerprint", "first_fingerprint_s_per_gb", "weight fingerprint, first time (s per GB)", "-", None),
    ("fingerprint", "cached_fingerprint_s", "weight fingerprint, cached (s)", "-", None),
    ("trl_compare", "ours_fixed_s_per_further_iteration", "fixed cost per further iteration, resident (s)", "<= 2",
     lambda v: v <= 2),
    ("trl_compare", "ours_in_loop_fixed_s_per_iteration", "fixed cost in the loop / iterations, resident (s)", "-",
     None),
    ("trl_compare", "ours_fixed_s_per_iteration", "all fixed cost / iterations, resident iterate (s)", "-", None),
    ("trl_compare", "ours_per_stage_fixed_s_per_iteration", "fixed cost per iteration, one process per stage (s)",
     "-", None),
    ("trl_compare", "wall_ratio_ours_over_trl", "ours / TRL SDFTTrainer, wall time", "<= 0.8", lambda v: v <= 0.8),
    ("trl_compare", "peak_ratio_ours_over_trl", "ours / TRL SDFTTrainer, peak memory (RSS)", "<= 1", lambda v: v <= 1),
]


def main():
    if not RESULTS.exists():
        raise SystemExit(f"{RESULTS} does not exist: run the benchmarks first (make bench)")
    results = json.loads(RESULTS.read_text())
    lines = [f"{'measure':52s} {'where':42s} {'value':>8s}  {'goal':8s} met"]
    for prefix, key, what, goal, test in ROWS:
        for section, values in results.items():
            if section.startswith(prefix) and key in values and not (prefix == "train" and "memory" in section):
                value = values[key]
                met = "-" if test is None else ("yes" if test(value) else "NO")
                where = section[len(prefix):].strip(" /,") or "-"
                lines.append(f"{what:52s} {where:42s} {value:8.3f}  {goal:8s} {met}")
    for section, values in results.items():
        if section.startswith("train peak memory"):
            ratios = {k: v for k, v in values.items() if k.endswith("_ratio")}
            worst = max(ratios, key=ratios.get)
            met = "yes" if ratios[worst] <= 1.5 else "NO"
            lines.append(f"{'train peak memory / chunked CE (worst of the grid)':52s} "
                         f"{section[len('train peak memory'):].strip() + ' ' + worst[:-6]:42s} {ratios[worst]:8.3f}  "
                         f"{'<= 1.5':8s} {met}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
