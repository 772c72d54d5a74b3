"""Who owns the engines of an iteration's steps: one stage command, or a resident `iterate`.

A stage command builds the engine it needs and closes it when the step is done (`StageEngines`). The
resident `iterate` keeps them (`ResidentEngines`): the student's engine is built once and takes each new
policy's weights in place (vLLM's `reload_weights`, or a state-dict load in the transformers engine), and
the teacher's engine, always the frozen base model, is built once. The student's vLLM engine sleeps while
the teacher scores and the trainer trains, and wakes up for the next rollout. On a GPU that is vLLM's own
sleep at level 2 (weights and KV cache freed; the engine is built with sleep mode, without which it frees
nothing), woken in two steps around each weight update (the weights' memory, the new policy's tensors, then the KV
cache): the colocated layout, each part within its own memory budget (`engine.vllm_gpu_memory_utilization` for
vLLM, the rest for the teacher and the trainer). A vLLM teacher never sleeps: vLLM's sleep acts on every engine
of its process's memory pool, so the teacher stays out of it and keeps its share. On a CPU the KV
cache's memory goes back to the system, and so do the weights with the packed copies vLLM's kernels keep of them
(engines/vllm_worker.py), since the next rollout loads the next policy's weights anyway: the trainer's peak no
longer has vLLM's model beside it.
"""

from __future__ import annotations

import time
from pathlib import Path

from rgsd_pipeline.config import RunConfig
from rgsd_pipeline.engines import Engine, Sampling, make_engine
from rgsd_pipeline.trainer_state import open_writes


class StageEngines:
    """Engines built for one step and closed after it."""

    resident = False

    def __init__(self, engine_kind: str | None = None):
        self.engine_kind = engine_kind

    world = None  # a rank of a data-parallel job: on GPUs its vLLM engine runs in this process

    def student(self, policy: Path, config: RunConfig) -> Engine:
        return make_engine(self.engine_kind or config.engine.kind, policy, config.engine, config.model,
                           sampling=Sampling.of(config), rank_of=self.world, sleeps=self.resident)

    def teacher(self, teacher: Path, config: RunConfig) -> Engine:
        kind = self.engine_kind or config.engine.score_kind or config.engine.kind
        return make_engine(kind, teacher, config.engine, config.model, max_logprobs=teacher_logprobs(config))

    def done(self, engine: Engine) -> None:
        engine.close()


class ResidentEngines(StageEngines):
    """Engines kept across iterations; the student's takes each policy's weights in place."""

    resident = True

    def __init__(self, engine_kind: str | None = None, world=None):
        super().__init__(engine_kind)
        self.world = world
        self._student: Engine | None = None
        self._teacher: Engine | None = None
        self.weight_loads = 0  # in-place swaps, for the summary
        self.freed_bytes: list[int] = []  # what each sleep of the student's engine gave back, for the summary
        self.start_seconds = 0.0  # spent building engines
        self.next_weights: dict | None = None  # the next policy's weights in memory, when the trainer kept them

    def student(self, policy: Path, config: RunConfig) -> Engine:
        if self._student is None:
            started = time.perf_counter()
            self._student = super().student(policy, config)
            self.start_seconds += time.perf_counter() - started
        else:
            if Path(self._student.model_path) != Path(policy) or self._student.weights_discarded:
                self._student.load_weights(policy, self.next_weights)  # a sleeping GPU engine wakes its weights
                self.weight_loads += 1
            self._student.wake_up()  # then its KV cache, after the update: the two are never held beside the new
        self.next_weights = None
        open_writes()  # the trainer state held back while the weights went in (training.export_policy)
        return self._student

    def start(self, base: Path, config: RunConfig) -> None:
        """Build the engines now, in a fixed order, before the trainer holds any memory: the student (from the base
        model, then asleep with its weights dropped: the first rollout loads its policy's), then the teacher. On GPUs
        vLLM takes its share of the memory only if that much is free when it starts, and a data-parallel job's
        engines start together (vLLM agrees on the KV cache's size across ranks), so no rank may build its engine
        later than another, as a resumed iteration whose rollouts are done on one rank would."""
        if self._student is None:
            self.student(base, config)
            self.done(self._student)
        self.teacher(base, config)

    @property
    def takes_weights_in_memory(self) -> bool:
        """Whether the student's engine runs in this process, so new weights reach it without a copy on disk."""
        return self._student is not None and self._student.in_process

    def teacher(self, teacher: Path, config: RunConfig) -> Engine:
        if self._teacher is None:  # its own engine even at iteration 0: the student's weights will change
            started = time.perf_counter()
            self._teacher = super().teacher(teacher, config)
            self.start_seconds += time.perf_counter() - started
        return self._teacher

    def done(self, engine: Engine) -> None:
        if engine is self._student:  # the next rollout loads the next policy's weights: these can go meanwhile
            self.freed_bytes.append(engine.sleep(discard_weights=True))

    def close(self) -> None:
        for engine in (self._student, self._teacher):
            if engine is not None:
                engine.close()
        self._student = self._teacher = None


def teacher_logprobs(config: RunConfig) -> int:
    """The most log-probs per position the teacher is asked for: score.top_k, or with rubric guidance its candidates
    (-1: the whole vocabulary, score.guidance_candidates=0)."""
    score = config.score
    if score.guidance <= 0:
        return score.top_k
    return -1 if score.guidance_candidates == 0 else max(score.top_k, score.guidance_candidates)
