"""Distillation losses: pure functions of arrays.

Per-example losses return the input's leading shape and leave the reduction
to the caller; batch-level losses say so and return a scalar.
"""

from jaxkd.losses._classification import cross_entropy as cross_entropy

from jaxkd.losses._soft_target import distillation_loss as distillation_loss
from jaxkd.losses._soft_target import kd_loss as kd_loss
from jaxkd.losses._soft_target import kl_divergence as kl_divergence
from jaxkd.losses._soft_target import log_soft_targets as log_soft_targets
from jaxkd.losses._soft_target import soft_cross_entropy as soft_cross_entropy
from jaxkd.losses._soft_target import soft_targets as soft_targets

from jaxkd.losses._divergences import jensen_shannon_divergence as jensen_shannon_divergence
from jaxkd.losses._divergences import reverse_kl_divergence as reverse_kl_divergence
from jaxkd.losses._divergences import total_variation_distance as total_variation_distance

from jaxkd.losses._skew import skew_kl_divergence as skew_kl_divergence
from jaxkd.losses._skew import skew_reverse_kl_divergence as skew_reverse_kl_divergence

from jaxkd.losses._sparse import sparse_kl_divergence as sparse_kl_divergence

from jaxkd.losses._logit import logit_regression_loss as logit_regression_loss

from jaxkd.losses._decoupled import dkd_loss as dkd_loss

from jaxkd.losses._perturbation import perturb_inputs as perturb_inputs
from jaxkd.losses._perturbation import perturbed_kd_loss as perturbed_kd_loss

from jaxkd.losses._ensemble import ensemble_log_soft_targets as ensemble_log_soft_targets
from jaxkd.losses._ensemble import ensemble_soft_targets as ensemble_soft_targets
from jaxkd.losses._ensemble import teacher_confidence_weights as teacher_confidence_weights
from jaxkd.losses._multi_teacher import multi_teacher_kd_loss as multi_teacher_kd_loss

from jaxkd.losses._feature import attention_transfer_loss as attention_transfer_loss
from jaxkd.losses._feature import hint_loss as hint_loss
from jaxkd.losses._feature import nst_loss as nst_loss

from jaxkd.losses._relational import pkt_loss as pkt_loss
from jaxkd.losses._relational import rkd_angle_loss as rkd_angle_loss
from jaxkd.losses._relational import rkd_distance_loss as rkd_distance_loss
from jaxkd.losses._relational import similarity_preserving_loss as similarity_preserving_loss

from jaxkd.losses._contrastive import CRDQueue as CRDQueue
from jaxkd.losses._contrastive import crd_loss as crd_loss
from jaxkd.losses._contrastive import init_crd_queue as init_crd_queue

from jaxkd.losses._adversarial import discriminator_loss as discriminator_loss
from jaxkd.losses._adversarial import generator_loss as generator_loss

from jaxkd.losses._data_free import batchnorm_statistics_loss as batchnorm_statistics_loss
from jaxkd.losses._data_free import dafl_activation_loss as dafl_activation_loss
from jaxkd.losses._data_free import dafl_information_entropy_loss as dafl_information_entropy_loss
from jaxkd.losses._data_free import dafl_one_hot_loss as dafl_one_hot_loss

from jaxkd.losses._self_distillation import teacher_free_kd_loss as teacher_free_kd_loss
from jaxkd.losses._self_distillation import virtual_teacher_log_targets as virtual_teacher_log_targets
from jaxkd.losses._self_distillation import virtual_teacher_targets as virtual_teacher_targets

from jaxkd.losses._transformer import attention_kl_loss as attention_kl_loss
from jaxkd.losses._transformer import hidden_state_loss as hidden_state_loss

__all__ = [
    "attention_kl_loss",
    "hidden_state_loss",
    "CRDQueue",
    "attention_transfer_loss",
    "batchnorm_statistics_loss",
    "crd_loss",
    "cross_entropy",
    "dafl_activation_loss",
    "dafl_information_entropy_loss",
    "dafl_one_hot_loss",
    "discriminator_loss",
    "distillation_loss",
    "dkd_loss",
    "ensemble_log_soft_targets",
    "ensemble_soft_targets",
    "generator_loss",
    "hint_loss",
    "init_crd_queue",
    "jensen_shannon_divergence",
    "kd_loss",
    "kl_divergence",
    "log_soft_targets",
    "logit_regression_loss",
    "multi_teacher_kd_loss",
    "nst_loss",
    "perturb_inputs",
    "perturbed_kd_loss",
    "pkt_loss",
    "reverse_kl_divergence",
    "rkd_angle_loss",
    "rkd_distance_loss",
    "similarity_preserving_loss",
    "skew_kl_divergence",
    "skew_reverse_kl_divergence",
    "soft_cross_entropy",
    "soft_targets",
    "sparse_kl_divergence",
    "teacher_confidence_weights",
    "teacher_free_kd_loss",
    "total_variation_distance",
    "virtual_teacher_log_targets",
    "virtual_teacher_targets",
]
