"""rgsd-pipeline: Rubric-Guided Self-Distillation of language models in inspectable, resumable stages."""

__version__ = "0.1.0"
