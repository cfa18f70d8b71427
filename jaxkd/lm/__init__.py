"""Language-model distillation: token losses, the fused output-layer loss.

* Per-token reductions that combine over shards and micro-batches
  (:func:`token_sum_and_count`, :func:`token_mean`), next-token alignment
  (:func:`next_token_targets`, :func:`next_token_logits`) and the teacher's
  top-k targets (:func:`top_k_log_probs`).
* :func:`fused_distillation_loss`: a divergence between a student's and a
  teacher's output distributions computed from their hidden states and
  output heads in token chunks and vocabulary tiles, never forming the
  ``[tokens, vocab]`` logits, with its own memory-flat backward pass.
* :func:`sample`: a jitted, fixed-shape sampler (temperature, top-k, top-p,
  EOS) over any model of the contract, for on-policy and sequence-level
  distillation.
* :class:`TeacherCacheWriter`, :class:`TeacherCache`: an offline cache of a
  teacher's per-token top-k log-probabilities in ArrayRecord files, read
  through grain with exact resumption.

``jaxkd.lm`` imports ``jax``, ``numpy``, ``grain``, ``array_record`` and,
of jaxkd, only ``jaxkd.losses`` (its argument checks,
:mod:`jaxkd.losses.validation`).
"""

from jaxkd.lm._cache import TeacherCache as TeacherCache
from jaxkd.lm._cache import TeacherCacheWriter as TeacherCacheWriter
from jaxkd.lm._fused import DIVERGENCES as DIVERGENCES
from jaxkd.lm._fused import HIDDEN_GRADS as HIDDEN_GRADS
from jaxkd.lm._fused import fused_distillation_loss as fused_distillation_loss
from jaxkd.lm._sampling import sample as sample
from jaxkd.lm._sampling import top_k_filter as top_k_filter
from jaxkd.lm._sampling import top_p_filter as top_p_filter
from jaxkd.lm._tokens import NextTokenTargets as NextTokenTargets
from jaxkd.lm._tokens import mean_from_sum_and_count as mean_from_sum_and_count
from jaxkd.lm._tokens import next_token_logits as next_token_logits
from jaxkd.lm._tokens import next_token_targets as next_token_targets
from jaxkd.lm._tokens import token_mean as token_mean
from jaxkd.lm._tokens import token_sum_and_count as token_sum_and_count
from jaxkd.lm._tokens import top_k_log_probs as top_k_log_probs

__all__ = [
    "DIVERGENCES",
    "HIDDEN_GRADS",
    "TeacherCache",
    "TeacherCacheWriter",
    "fused_distillation_loss",
    "NextTokenTargets",
    "mean_from_sum_and_count",
    "next_token_logits",
    "next_token_targets",
    "token_mean",
    "token_sum_and_count",
    "top_k_filter",
    "top_k_log_probs",
    "top_p_filter",
    "sample",
]
