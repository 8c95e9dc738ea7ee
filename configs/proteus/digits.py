"""Proteus at toy scale, offline: a tiny DINOv2-style teacher distilled into a smaller student on
scikit-learn's digits (28x28, patch 7 -> 16 patches). Used by the tests and the small-scale study.

    python -m projects.proteus.train --config configs/proteus/digits.py --workdir /tmp/proteus_digits \\
        --config.proteus.teacher_weights=/tmp/teacher/best
"""
import ml_collections

from configs import common
from configs.proteus.imagenet import proteus_section

TINY = dict(img_size=28, patch_size=7, depth=2, num_heads=2, init_values=1.0)


def get_config(arg=None):
    arg = common.parse_arg(arg, student_dim=32, teacher_dim=64, epochs=10, lr=2e-3, runlocal=False)
    c = common.digits_config(model="dinov2_tiny", image_size=28, epochs=arg.epochs, lr=arg.lr, warmup_epochs=1,
                             runlocal=arg.runlocal)
    c.task = "proteus"
    c.model.kwargs = ml_collections.ConfigDict(dict(TINY, embed_dim=arg.student_dim))
    c.proteus = proteus_section("dinov2_tiny", teacher_dtype="float32",
                                teacher_kwargs=ml_collections.ConfigDict(dict(TINY, embed_dim=arg.teacher_dim)))
    c.label_smoothing = 0.0
    c.input.scale = (0.5, 1.0)
    c.ema_decay = 0.0
    return c
