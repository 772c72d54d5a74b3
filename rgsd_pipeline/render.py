"""What the student and the teacher see: chat messages from a prompts row, then token ids.

The student sees the prompt's messages. The teacher sees the same conversation with the last user
message rewritten by the configured template: the question plus its rubric (the paper's wording by
default, docs/architecture.md "The teacher's prompt"), or plus a reference answer. Both are tokenized
with the model's own chat template and a generation prompt, so a response sampled after the student's
ids can be appended unchanged after the teacher's ids.
"""

from __future__ import annotations

from rgsd_pipeline.config import ConfigError, TemplateConfig


def student_messages(row: dict, template: TemplateConfig) -> list[dict]:
    """The conversation the student is prompted with."""
    system = [{"role": "system", "content": template.system_prompt}] if template.system_prompt else []
    return system + [dict(m) for m in row["messages"]]


def format_criteria(rubric: list[dict], template: TemplateConfig) -> str:
    """The criteria block of the teacher message, per the template's points and pitfall options."""

    def lines(criteria):
        out = []
        for index, c in enumerate(criteria, start=1):
            line = template.criterion_format.format(index=index, criterion=c["criterion"], points=_points(c["points"]))
            if template.show_points:
                line += f" ({_points(c['points'])} points)"
            out.append(line)
        return "\n".join(out)

    if template.pitfalls == "inline":
        return lines(rubric)
    positives = [c for c in rubric if c["points"] >= 0]
    pitfalls = [c for c in rubric if c["points"] < 0]
    block = lines(positives)
    if template.pitfalls == "avoid" and pitfalls:
        block += f"\n\n{template.pitfalls_header}\n{lines(pitfalls)}"
    return block


def _points(points: float) -> str:
    return str(int(points)) if float(points).is_integer() else f"{points:g}"


def teacher_messages(row: dict, template: TemplateConfig) -> list[dict]:
    """The conversation the teacher scores with: the last user turn carries the rubric (or reference)."""
    messages = student_messages(row, template)
    question = messages[-1]["content"]
    if template.teacher == "student":
        return messages  # the placebo: the teacher sees what the student sees, so it can only pull back to the base
    if template.teacher == "reference":
        if not row.get("reference_answer"):
            raise ConfigError("template.teacher=reference needs a reference_answer for every prompt")
        content = template.reference_template.format_map(
            {"question": question, "reference_answer": row["reference_answer"]})
    else:
        rubric = shown_criteria(row["rubric"], template)
        if not rubric:
            return messages  # nothing to show: the teacher reads what the student reads, and teaches nothing
        content = template.rubric_template.format_map({"question": question,
                                                       "criteria": format_criteria(rubric, template)})
    messages[-1] = {"role": "user", "content": content}
    return messages


def shown_criteria(rubric: list[dict], template: TemplateConfig) -> list[dict]:
    """The criteria the teacher reads: all of them, or those carrying one of template.only_tags."""
    if not template.only_tags:
        return rubric
    wanted = set(template.only_tags)
    return [c for c in rubric if wanted & set(c.get("tags") or [])]


def chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a conversation through the chat template, ending with the assistant generation prompt."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return [int(i) for i in ids]


def chat_text(tokenizer, messages: list[dict]) -> str:
    """The exact text the model reads for a conversation (chat template applied, generation prompt added)."""
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def check_template(template: TemplateConfig) -> None:
    """Raise ValueError when a template names a placeholder that rgsd-pipeline does not fill."""
    sample = {"messages": [{"role": "user", "content": "q"}], "reference_answer": "a",
              "rubric": [{"criterion": "c", "points": 1.0, "tags": []}, {"criterion": "p", "points": -1.0, "tags": []}]}
    try:
        teacher_messages(sample, template)
    except (KeyError, IndexError) as err:
        raise ConfigError(f"template: unknown placeholder {err} (rubric_template knows {{question}} and {{criteria}}; "
                         "criterion_format knows {index}, {criterion}, {points}; reference_template knows "
                         "{question} and {reference_answer})") from None
