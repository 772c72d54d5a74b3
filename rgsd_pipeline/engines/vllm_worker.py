"""Methods mixed into vLLM's worker processes (`LLM(worker_extension_cls=...)`): in-place weight reloads, and
the KV cache's and the weights' memory released while a CPU engine sleeps.

vLLM's own `reload_weights` loads the new tensors into the model's parameters, but what the worker
derived from the weights at first load stays as it was. On CPUs every linear layer, the LM head
included, keeps a packed copy of its weight for oneDNN or the small-GEMM kernel. A model that ties its
LM head to the embeddings (SmolLM2, Qwen2.5-0.5B/1.5B/3B) has no `lm_head.weight` in its checkpoint,
so the reload never touches the head and its packed copy keeps the base weights: the engine would
sample from "new body + base head". After every reload the tied head is processed again, which packs
it from the embeddings just loaded (on GPUs that is a no-op: the head reads the shared tensor).

This module is imported by vLLM inside its worker processes (in the engine's own process when it runs there); its
only state is the sizes of what a sleeping engine released (KV cache, discarded weights). Importing it puts the
CPU sampler of `engines.vllm_sampling` in place, in the process that samples.
"""

from __future__ import annotations

from collections.abc import Iterable

from rgsd_pipeline.engines import vllm_sampling

vllm_sampling.install()


class WeightSync:
    """vLLM worker extension: `collective_rpc("rgsd_reload_weights", kwargs=...)` from the engine's owner."""

    rgsd_kv_cache_bytes: dict  # storage identity -> size in bytes, kept while the KV cache is released
    rgsd_weight_bytes: dict  # parameter name -> size in bytes, kept while the weights are discarded

    def rgsd_reload_weights(self, weights_path: str | None = None,
                            named_weights: Iterable[tuple[str, object]] | None = None) -> None:
        """Take new weights in place, from a checkpoint folder or from (name, tensor) pairs in memory, then
        rebuild what the worker derived from the tied LM head."""
        model = self.model_runner.get_model()
        # the reload copies into the parameters' own storage
        _regrow(_weight_storages(model), getattr(self, "rgsd_weight_bytes", {}))
        self.rgsd_weight_bytes = {}
        if named_weights is not None:
            self.model_runner.reload_weights(weights_iterator=iter(named_weights))
        else:
            self.model_runner.reload_weights(weights_path=weights_path)
        head = getattr(model, "lm_head", None)
        embeddings = getattr(getattr(model, "model", None), "embed_tokens", None)
        if head is not None and embeddings is not None and getattr(head, "weight", None) is embeddings.weight:
            head.quant_method.process_weights_after_loading(head)

    def rgsd_discard_weights(self) -> int:
        """CPU: free the model's weights and the packed copies the linear layers' kernels keep of them (vLLM's level-2
        sleep needs CUDA): the parameters' storage shrinks to nothing and each layer's kernel is dropped. Only a
        reload (rgsd_reload_weights) makes the model run again; it packs every layer anew, the tied LM head from
        the embeddings. Returns the bytes of parameter storage released (the packed copies come on top)."""
        model = self.model_runner.get_model()
        for module in model.modules():
            if hasattr(module, "cpu_linear"):
                module.cpu_linear = _discarded
        self.rgsd_weight_bytes = getattr(self, "rgsd_weight_bytes", {})
        return _shrink(_weight_storages(model), self.rgsd_weight_bytes)

    def rgsd_release_kv_cache(self) -> int:
        """CPU: hand the KV cache's memory back to the system while the engine sleeps (vLLM's own sleep needs
        CUDA). Its storage shrinks to nothing; the layers' views of it stay as they are. Returns the bytes
        released."""
        self.rgsd_kv_cache_bytes = getattr(self, "rgsd_kv_cache_bytes", {})
        return _shrink(_kv_storages(self.model_runner.kv_caches), self.rgsd_kv_cache_bytes)

    def rgsd_restore_kv_cache(self) -> None:
        """Give the KV cache its storage back before the engine runs again. Fresh pages cost memory only where the
        next requests write their blocks, and no request reads a block before writing it."""
        _regrow(_kv_storages(self.model_runner.kv_caches), getattr(self, "rgsd_kv_cache_bytes", {}))


def _shrink(storages: dict, sizes: dict) -> int:
    """Shrink each storage to nothing, recording its size under its key in `sizes` (a storage already shrunk keeps
    the size recorded before); returns the bytes released."""
    released = 0
    for key, storage in storages.items():
        sizes[key] = max(sizes.get(key, 0), storage.nbytes())
        released += storage.nbytes()
        storage.resize_(0)
    return released


def _regrow(storages: dict, sizes: dict) -> None:
    """Give each shrunk storage back the size `_shrink` recorded (its contents are whatever the memory holds)."""
    for key, storage in storages.items():
        if storage.nbytes() == 0 and sizes.get(key):
            storage.resize_(sizes[key])


def _weight_storages(model) -> dict:
    """The storage behind each of the model's parameters, by name."""
    return {name: parameter.untyped_storage() for name, parameter in model.named_parameters()}


def _discarded(*args):
    raise RuntimeError("this vLLM engine's weights were discarded while it slept; load_weights gives them back")


def _kv_storages(kv_caches) -> dict:
    """The storages behind the layers' KV cache views (one shared allocation on CPUs), keyed by identity."""
    storages = {}
    for tensor in kv_caches:
        for t in tensor if isinstance(tensor, list | tuple) else [tensor]:
            storage = t.untyped_storage()
            storages.setdefault(storage._cdata, storage)
    return storages
