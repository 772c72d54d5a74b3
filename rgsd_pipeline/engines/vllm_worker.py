"""Methods mixed into vLLM's worker processes (`LLM(worker_extension_cls=...)`): in-place weight reloads.

vLLM's own `reload_weights` loads the new tensors into the model's parameters, but what the worker
derived from the weights at first load stays as it was. On CPUs every linear layer, the LM head
included, keeps a packed copy of its weight for oneDNN or the small-GEMM kernel. A model that ties its
LM head to the embeddings (SmolLM2, Qwen2.5-0.5B/1.5B/3B) has no `lm_head.weight` in its checkpoint,
so the reload never touches the head and its packed copy keeps the base weights: the engine would
sample from "new body + base head". After every reload the tied head is processed again, which packs
it from the embeddings just loaded (on GPUs that is a no-op: the head reads the shared tensor).

This module is imported by vLLM inside its worker processes; it holds no state of its own.
"""

from __future__ import annotations

from collections.abc import Iterable


class WeightSync:
    """vLLM worker extension: `collective_rpc("rgsd_reload_weights", kwargs=...)` from the engine's owner."""

    def rgsd_reload_weights(self, weights_path: str | None = None,
                            named_weights: Iterable[tuple[str, object]] | None = None) -> None:
        """Take new weights in place, from a checkpoint folder or from (name, tensor) pairs in memory, then
        rebuild what the worker derived from the tied LM head."""
        if named_weights is not None:
            self.model_runner.reload_weights(weights_iterator=iter(named_weights))
        else:
            self.model_runner.reload_weights(weights_path=weights_path)
        model = self.model_runner.get_model()
        head = getattr(model, "lm_head", None)
        embeddings = getattr(getattr(model, "model", None), "embed_tokens", None)
        if head is not None and embeddings is not None and getattr(head, "weight", None) is embeddings.weight:
            head.quant_method.process_weights_after_loading(head)
