r"""CIFAR-100, ResNet-32x4 teacher -> ResNet-8x4 student: the CRD/DKD recipe.

The benchmark of Tian et al. (CRD, 2020) and Zhao et al. (DKD, 2022): SGD
with momentum 0.9, weight decay 5e-4, batch 64, 240 epochs, learning rate
0.05 divided by 10 at epochs 150, 180 and 210, random crop (4-pixel padding)
and horizontal flip. KD: T = 4, 0.1 CE + 0.9 KD. DKD: CE + DKD with
alpha = 1, beta = 8, T = 4, linearly warmed up over the first 20 epochs. The
teacher is trained with the same recipe in the same run (or loaded with
``--config.teacher.load=<name>``). Weight decay here applies to kernels
only (the references decay every parameter).

Published top-1 (%), single runs or means as reported: teacher 79.42,
student 72.50, KD 73.33, FitNet 73.50, AT 73.44, SP 72.94, RKD 71.90,
PKT 73.64, CRD 75.51 (Tian et al., Contrastive Representation Distillation,
ICLR 2020, Table 1), DKD 76.32 (Zhao et al., Decoupled Knowledge
Distillation, CVPR 2022, Table 1).

Needs CIFAR-100 prepared as ArrayRecord (jaxkd.data says how). Launch:

  python -m experiments.main \
      --config=experiments/configs/cifar100_resnet32x4_resnet8x4.py \
      --mode=pipeline --workdir=/tmp/kd/c100_r32x4_r8x4

Expected runtime: not measured on an accelerator. On the 2-core CPU of
MEASURED.md a distillation step runs at about 70 examples/s, i.e. about
2 days per 240-epoch student and as much for the teacher: use a GPU.
``--mode=compare`` trains every feature/logit method of the benchmark.
``:runlocal`` (128 images, 2 steps per epoch): about a minute on a CPU.
"""

from experiments.configs import common


def get_config(arg=None):
  """The CRD/DKD CIFAR-100 recipe; ``arg``: ``runlocal``, ``seeds=N``."""
  arg = common.parse_arg(arg, runlocal=False, seeds=3)
  config = common.base_config()
  config.name = "cifar100_resnet32x4_resnet8x4"
  config.dataset = "cifar100"
  config.batch_size = 64
  config.eval_batch_size = 256
  config.num_epochs = 240
  config.optimizer = common.optimizer_config()  # SGD 0.05, /10 at 150/180/210
  config.teacher.optimizer = common.optimizer_config()
  config.teacher.model = "resnet32x4"
  config.student.model = "resnet8x4"
  config.method = "kd"
  config.kd.temperature = 4.0
  config.kd.alpha = 0.9
  config.dkd.alpha = 1.0
  config.dkd.beta = 8.0
  config.dkd.temperature = 4.0
  config.dkd.warmup_epochs = 20
  # The features the CRD benchmark uses for this pair.
  config.fitnets.student_feature = "stage2"
  config.fitnets.teacher_feature = "stage2"
  config.at.features = ("stage1", "stage2", "stage3")
  config.sp.student_feature = "stage3"
  config.sp.teacher_feature = "stage3"
  config.pipeline.methods = ("kd", "dkd")
  config.pipeline.seeds = arg.seeds
  config.pipeline.latency_batch_size = 64
  config.compare.methods = ("kd", "dkd", "fitnets", "at", "sp", "rkd",
                            "pkt", "crd")
  config.sweep.temperatures = (1.0, 2.0, 4.0, 8.0)
  config.log_every_steps = 100
  if arg.runlocal:
    common.runlocal(config)
  return config
