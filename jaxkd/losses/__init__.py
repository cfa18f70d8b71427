"""Distillation losses: pure functions of arrays.

Per-example losses return the input's leading shape and leave the reduction
to the caller; batch-level losses say so and return a scalar.
"""

from jaxkd.losses._soft_target import kd_loss as kd_loss
from jaxkd.losses._soft_target import kl_divergence as kl_divergence
from jaxkd.losses._soft_target import log_soft_targets as log_soft_targets
from jaxkd.losses._soft_target import soft_targets as soft_targets
from jaxkd.losses._soft_target import soft_cross_entropy as soft_cross_entropy
from jaxkd.losses._soft_target import distillation_loss as distillation_loss
