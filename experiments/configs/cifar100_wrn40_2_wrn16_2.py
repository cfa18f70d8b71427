r"""CIFAR-100, WRN-40-2 teacher -> WRN-16-2 student: the CRD/DKD recipe.

Same training recipe as ``cifar100_resnet32x4_resnet8x4.py`` (SGD momentum
0.9, weight decay 5e-4 on kernels, batch 64, 240 epochs, learning rate 0.05
divided by 10 at 150/180/210; KD T = 4 with 0.1 CE + 0.9 KD; DKD alpha 1,
beta 8, T 4, 20-epoch warm-up).

Published top-1 (%): teacher 75.61, student 73.26, KD 74.92, FitNet 73.58,
AT 74.08, SP 73.83, RKD 73.35, PKT 74.54, CRD 75.48 (Tian et al., ICLR 2020,
Table 1, as listed in RepDistiller's README); DKD 76.23 (Zhao et al., CVPR
2022, as listed in mdistiller's README).

  python -m experiments.main \
      --config=experiments/configs/cifar100_wrn40_2_wrn16_2.py \
      --mode=pipeline --workdir=/tmp/kd/c100_wrn40_2_wrn16_2

Expected runtime: not measured on an accelerator; on a 2-core CPU, days
(use a GPU). ``:runlocal``: about a minute on a CPU.
"""

from experiments.configs import cifar100_resnet32x4_resnet8x4 as resnet_pair
from experiments.configs import common


def get_config(arg=None):
  """WRN-40-2 -> WRN-16-2 on CIFAR-100; ``arg``: ``runlocal``, ``seeds=N``."""
  parsed = common.parse_arg(arg, runlocal=False, seeds=3)
  config = resnet_pair.get_config(arg)
  config.name = "cifar100_wrn40_2_wrn16_2"
  config.teacher.model = "wrn_40_2"
  config.student.model = "wrn_16_2"
  config.pipeline.seeds = parsed.seeds
  return config
