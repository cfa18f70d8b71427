"""The offline language-model experiment: byte-level distillation on the Python standard library.

``python -m experiments.lm --config=experiments/configs/lm_stdlib.py
--workdir=runs/lm_stdlib`` trains a teacher, a baseline student and
distilled students (forward KL, reverse KL, JSD, skew KL, sparse top-k,
two-teacher mixture, on-policy GKD) through the library's one engine and
reports bits per byte. ``data`` reads and splits the bytes, ``runner``
trains and writes the results; nothing of the image experiments is used.
"""
