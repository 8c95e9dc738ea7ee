"""EfficientMod on the embedded handwritten digits (scikit-learn's, offline): a few minutes on a CPU.

    python -m projects.efficientmod.train --config configs/efficientmod/digits.py --workdir /tmp/effmod_digits

At 32x32 the stride-32 last stage is a 1x1 map (the attention blocks then see one token), so the
default is 64x64 (a 2x2 last map, 4x4 tokens in stage 3).
"""
from configs import common


def get_config(arg=None):
    arg = common.parse_arg(arg, variant="xxs", image_size=64, epochs=15, runlocal=False)
    return common.digits_config(model=f"efficientmod_{arg.variant}", image_size=arg.image_size, epochs=arg.epochs,
                                lr=2e-3, runlocal=arg.runlocal)
