"""rgsd-pipeline: Rubric-Guided Self-Distillation of language models in inspectable, resumable stages.

Tensor and array names carry their shape as suffixes (`logits_C_V`, `topk_ids_N_K`); each letter means
one thing everywhere in the package:

    B   sequences in a batch (rows of a padded batch)
    T   tokens of a sequence (time); in engine records, the response positions of one sequence
    N   trained (or scored) positions of a batch, flattened across its sequences
    C   positions in one chunk of N or T (the LM head runs chunk by chunk)
    K   teacher top-k entries per position
    K1  K + 1 buckets: the top-k and the tail
    V   the vocabulary
    H   the model's hidden size
    S   sequences counted in a reduction (one entry per sequence)
"""

__version__ = "0.1.0"
