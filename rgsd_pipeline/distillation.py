"""RGSD's losses as objects (rgsd_pipeline/objectives.py): the student matches the teacher's stored signals.

    jsd                  generalized JSD(beta) over the teacher's top-k + tail buckets, clipped at tau
                         (losses.distill_per_token), both sides at train.distill_temperature
    sampled_reverse_kl   on-policy distillation's sampled-token estimator, each token weighted by the truncated
                         importance weight against the behaviour policy (losses.sampled_reverse_kl)

Both optionally mix in cross-entropy on the sampled tokens (train.ce_weight). The math, with its float64 tests, is
rgsd_pipeline/losses.py; shapes as in rgsd_pipeline/__init__.py.
"""

from __future__ import annotations

from rgsd_pipeline.objectives import Objective


class Distillation(Objective):
    name = "jsd"
    reads_signals = True
    stats = ("divergence", "clipped", "teacher_tail", "student_tail", "importance_weight")

    def _divergence_and_loss(self, student_C_K1, teacher_C_K1, student_token_C, targets, spec):
        """(loss_C, divergence_C, clipped_C, importance_C) of this kind."""
        from rgsd_pipeline.losses import distill_per_token, temper

        loss_C, divergence_C, clipped_C = distill_per_token(temper(student_C_K1, spec.temperature),
                                                            temper(teacher_C_K1, spec.temperature),
                                                            spec.beta, spec.clip, spec.tau)
        return loss_C, divergence_C, clipped_C, student_token_C.new_ones(student_token_C.shape)

    def loss(self, student_C_V, student_token_C, targets, spec):
        from rgsd_pipeline.losses import student_buckets, teacher_buckets

        student_C_K1 = student_buckets(student_C_V, targets.topk_ids_N_K)
        teacher_C_K1 = teacher_buckets(targets.teacher_topk_N_K, targets.teacher_tail_N)
        loss_C, divergence_C, clipped_C, importance_C = self._divergence_and_loss(student_C_K1, teacher_C_K1,
                                                                                  student_token_C, targets, spec)
        if spec.ce_weight:
            loss_C = loss_C - spec.ce_weight * student_token_C
        return loss_C, {"divergence": divergence_C, "clipped": clipped_C.float(),
                        "teacher_tail": teacher_C_K1[:, -1].exp(), "student_tail": student_C_K1[:, -1].detach().exp(),
                        "importance_weight": importance_C}

    def metrics(self, sums: dict[str, float], tokens: int) -> dict[str, float]:
        per_token = {name: sums[name] / max(tokens, 1) for name in self.stats}
        return {"divergence": per_token["divergence"], "clip_fraction": per_token["clipped"],
                "teacher_tail_mass": per_token["teacher_tail"], "student_tail_mass": per_token["student_tail"],
                "importance_weight": per_token["importance_weight"]}


class SampledReverseKL(Distillation):
    name = "sampled_reverse_kl"

    def reads_behaviour(self, train) -> bool:
        return train.importance_cap > 0

    def check(self, config) -> None:
        super().check(config)
        if config.train.distill_temperature != 1.0:
            from rgsd_pipeline.config import ConfigError

            raise ConfigError(f"train.distill_temperature={config.train.distill_temperature} with "
                              "train.loss=sampled_reverse_kl: the sampled-token estimator is defined for the model's "
                              "own distribution (temperature 1); use loss=jsd to distil at another temperature")

    def _divergence_and_loss(self, student_C_K1, teacher_C_K1, student_token_C, targets, spec):
        from rgsd_pipeline.losses import distill_per_token, importance_weights, sampled_reverse_kl

        importance_C = importance_weights(student_token_C, targets.behaviour_token_N, spec.importance_cap)
        loss_C = importance_C * sampled_reverse_kl(student_token_C, targets.teacher_token_N)
        _, divergence_C, clipped_C = distill_per_token(student_C_K1, teacher_C_K1, 1.0)
        return loss_C, divergence_C, clipped_C, importance_C


JSD = Distillation()
SAMPLED_REVERSE_KL = SampledReverseKL()
