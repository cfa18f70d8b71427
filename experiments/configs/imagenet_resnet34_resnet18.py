r"""ImageNet, ResNet-34 teacher -> ResNet-18 student (torchvision layouts).

The ImageNet benchmark of Tian et al. (CRD, 2020) and Zhao et al. (DKD,
2022): SGD with momentum 0.9, weight decay 1e-4 (kernels only here), batch
256, 100 epochs, learning rate 0.1 divided by 10 at epochs 30, 60 and 90,
random-resized crops of 224 and flips. KD with T = 1 and 0.5 CE + 0.5 KD,
DKD with alpha 0.5, beta 0.5, T 1 (mdistiller's ImageNet settings).

Published top-1 (%): teacher 73.31 and student 69.75 (torchvision's
pretrained ResNet-34 and ResNet-18), KD 70.66 (Tian et al., ICLR 2020,
Table 3) and 71.03 (KD re-run in Zhao et al., CVPR 2022, Table 3), DKD
71.70 (ibid.).

What is missing: the models are bundled (``jaxkd.models.create("resnet34")``,
torchvision's layout and parameter counts) but
torchvision's pretrained weights are not available without PyTorch, so the
teacher is trained from scratch in the same run (100 epochs), or loaded
with ``--config.teacher.load=<name>`` from ``<workdir>/teachers`` if you have
converted or trained one. ImageNet must be prepared as ArrayRecord with a
manual download (``jaxkd.data.prepare('imagenet2012')`` says how).

  python -m experiments.main \
      --config=experiments/configs/imagenet_resnet34_resnet18.py \
      --mode=pipeline --workdir=/tmp/kd/imagenet_r34_r18

Expected runtime: not measured (needs accelerators: on one GPU about a day
per 100-epoch ResNet-18). ``:runlocal`` (64 images of 64x64, 2 steps per
epoch): about a minute on a CPU.
"""

from experiments.configs import common


def get_config(arg=None):
  """ResNet-34 -> ResNet-18 on ImageNet; ``arg``: ``runlocal``, ``seeds=N``."""
  arg = common.parse_arg(arg, runlocal=False, seeds=1)
  config = common.base_config()
  config.name = "imagenet_resnet34_resnet18"
  config.dataset = "imagenet2012"
  config.batch_size = 256
  config.eval_batch_size = 500
  config.num_epochs = 100
  recipe = dict(name="sgd", learning_rate=0.1, momentum=0.9,
                weight_decay=1e-4, schedule="piecewise",
                decay_epochs=(30, 60, 90), decay_factor=0.1)
  config.optimizer = common.optimizer_config(**recipe)
  config.teacher.optimizer = common.optimizer_config(**recipe)
  config.teacher.model = "resnet34"
  config.student.model = "resnet18"
  config.method = "kd"
  config.kd.temperature = 1.0
  config.kd.alpha = 0.5
  config.dkd.alpha = 0.5
  config.dkd.beta = 0.5
  config.dkd.temperature = 1.0
  config.dkd.warmup_epochs = 1
  config.at.features = ("stage1", "stage2", "stage3", "stage4")
  config.pipeline.methods = ("kd", "dkd")
  config.pipeline.seeds = arg.seeds
  config.pipeline.latency_batch_size = 64
  config.compare.methods = ("kd", "dkd", "at", "crd")
  config.log_every_steps = 200
  if arg.runlocal:
    common.runlocal(config, test_split="validation")
    config.image_size = 64
    config.train_split = "train[:64]"
    config.batch_size = 8
    config.eval_batch_size = 8
    config.test_split = "validation[:16]"
    config.pipeline.latency_batch_size = 8
  return config
