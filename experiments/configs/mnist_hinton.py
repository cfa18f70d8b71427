r"""MNIST, Hinton et al. (2015): a 1200-1200 teacher into an 800-800 student.

Teacher: 784-1200-1200-10 ReLU MLP with dropout (20 % on the input, 50 % on
the hidden units) trained on images jittered by up to 2 pixels. Student:
784-800-800-10, no regularisation, no jitter, trained on the soft targets of
the teacher at temperature T = 20 (with 0.1 of the weight on the labels).
Hinton, Vinyals and Dean, Distilling the Knowledge in a Neural Network
(2015), section 3, report 67 test errors for the teacher, 146 for the
student trained on labels only and 74 for the distilled student (on the
10,000 test images: 99.33 %, 98.54 %, 99.26 %).

The optimiser is ours (the paper gives no schedule): SGD with momentum 0.9,
learning rate 0.05 with a cosine decay, 60 epochs, batch 128.

Needs MNIST prepared as ArrayRecord (``tfds build mnist
--file_format=array_record`` where TensorFlow and a network are available).

  python -m experiments.main --config=experiments/configs/mnist_hinton.py \
      --mode=pipeline --workdir=/tmp/kd/mnist_hinton

Expected runtime on a 2-core CPU (MEASURED.md-class machine): a teacher step
of batch 128 takes about 40 ms and a student step about 25 ms, so about
20 minutes per teacher and 12 minutes per student, about 45 minutes per seed
(students reuse cached teacher logits). ``:runlocal``: under a minute.
"""

from experiments.configs import common


def get_config(arg=None):
  """Hinton et al.'s MNIST experiment; ``arg``: ``runlocal``, ``seeds=N``."""
  arg = common.parse_arg(arg, runlocal=False, seeds=3)
  config = common.base_config()
  config.name = "mnist_hinton"
  config.dataset = "mnist"
  config.augment = "none"
  config.in_memory = True
  config.batch_size = 128
  config.eval_batch_size = 1000
  config.num_epochs = 60
  sgd = dict(name="sgd", learning_rate=0.05, momentum=0.9, weight_decay=0.0,
             schedule="cosine")
  config.optimizer = common.optimizer_config(**sgd)
  config.teacher.optimizer = common.optimizer_config(**sgd)
  config.teacher.model = "hinton_teacher"
  config.teacher.shift_pixels = 2
  config.student.model = "hinton_student"
  config.method = "kd"
  config.kd.temperature = 20.0
  config.kd.alpha = 0.9
  config.pipeline.methods = ("kd",)
  config.pipeline.seeds = arg.seeds
  config.sweep.temperatures = (2.0, 5.0, 10.0, 20.0, 40.0)
  config.log_every_steps = 100
  if arg.runlocal:
    common.runlocal(config)
  return config
