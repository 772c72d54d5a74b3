"""One self-contained HTML page of an iteration's rollouts, each token coloured by the teacher–student gap.

Red: the student was surer of its token than the teacher (log-prob gap > 0); blue: the teacher liked the
token more. Hovering a token shows both log-probs and the teacher's top alternatives. Tokens outside
the loss mask are grey and underlined. No scripts, no external resources: the page opens anywhere.
"""

from __future__ import annotations

import html
import math

import polars as pl

STYLE = """
body { font: 14px/1.5 system-ui, sans-serif; margin: 2em auto; max-width: 70em; color: #222; }
h1 { font-size: 1.3em; } h2 { font-size: 1em; margin: 1.6em 0 .3em; color: #555; }
.legend span { padding: 0 .4em; }
.response { white-space: pre-wrap; font-family: ui-monospace, monospace; border: 1px solid #ddd;
            padding: .6em; border-radius: 4px; }
.t { position: relative; border-radius: 2px; }
.t.masked { color: #999; text-decoration: underline dotted; }
.t .tip { display: none; position: absolute; left: 0; top: 1.6em; z-index: 10; background: #fff;
          border: 1px solid #888; padding: .3em .5em; white-space: pre; font-size: 12px; box-shadow: 0 2px 6px #0003; }
.t:hover .tip { display: block; }
"""


def colour(gap: float, scale: float = 3.0) -> str:
    """Background for a token: red when its log-prob gap > 0, blue when < 0, alpha growing with |gap| / scale."""
    if gap is None or math.isnan(gap):
        return "transparent"
    alpha = min(abs(gap) / scale, 1.0) * 0.75
    return f"rgba(214,39,40,{alpha:.2f})" if gap > 0 else f"rgba(31,119,180,{alpha:.2f})"


def _visible(text: str) -> str:
    return text if text.strip() else text.replace(" ", "·").replace("\n", "↵\n") or "∅"


def _tip(row: dict, vocab: dict[int, str], alternatives: int) -> str:
    lines = [f"student log-prob {row['policy_logprob']:.3f}   teacher log-prob {row['teacher_logprob']:.3f}",
             f"log-prob gap {row['logprob_gap']:+.3f}{'' if row['mask'] else '   (not in the loss)'}",
             "teacher's top tokens:"]
    pairs = zip(row["teacher_topk_ids"], row["teacher_topk_logprobs"], strict=True)
    for token_id, logprob in list(pairs)[:alternatives]:
        lines.append(f"  {math.exp(logprob):6.1%}  {vocab.get(token_id, '?')!r}")
    return html.escape("\n".join(lines))


def render(title: str, token_rows: pl.DataFrame, rollout_rows: pl.DataFrame, vocab: dict[int, str],
           alternatives: int = 5) -> str:
    """The page for the given rollouts (`rollout_rows`: prompt_id, sample_idx, logprob_gap_mean, ...) and their
    tokens."""
    by_rollout = token_rows.sort("prompt_id", "sample_idx", "position").partition_by(
        "prompt_id", "sample_idx", as_dict=True, maintain_order=True)
    sections = []
    for r in rollout_rows.iter_rows(named=True):
        rows = by_rollout.get((r["prompt_id"], r["sample_idx"]))
        if rows is None:
            continue
        spans = []
        for t in rows.iter_rows(named=True):
            css = "t" if t["mask"] else "t masked"
            text, tip = html.escape(_visible(t["token"] or "")), _tip(t, vocab, alternatives)
            background = colour(t["logprob_gap"])
            spans.append(f'<span class="{css}" data-pos="{t["position"]}" style="background:{background}">'
                         f'{text}<span class="tip">{tip}</span></span>')
        mean = r.get("logprob_gap_mean")
        sections.append(f'<h2>{html.escape(r["prompt_id"])} · sample {r["sample_idx"]} · {rows.height} tokens · '
                        f'mean log-prob gap {"-" if mean is None else format(mean, "+.3f")} · '
                        f'{html.escape(str(r.get("finish_reason", "")))}</h2>'
                        f'<div class="response">{"".join(spans)}</div>')
    legend = (f'<p class="legend"><span style="background:{colour(3)}">student surer than teacher</span> '
              f'<span style="background:{colour(-3)}">teacher surer than student</span> '
              '<span class="t masked">not in the loss</span> — hover a token for log-probs and the teacher\'s '
              'alternatives.</p>')
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f'<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>{legend}{"".join(sections)}</body></html>')
