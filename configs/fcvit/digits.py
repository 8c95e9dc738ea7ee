"""FCViT-tiny on the embedded handwritten digits (scikit-learn's, offline).

    python -m projects.fcvit.train --config configs/fcvit/digits.py --workdir /tmp/fcvit_digits

At 32x32 the stride-4 stem and three reducers leave maps of 8, 4, 2 and 1 pixels per side: the
11x11 depthwise convs then see the whole map, and the global context's statistics (over 8 heads x
pixels) stay defined down to the 1x1 map.
"""
from configs import common


def get_config(arg=None):
    arg = common.parse_arg(arg, variant="tiny", image_size=32, epochs=30, runlocal=False)
    return common.digits_config(model=f"fcvit_{arg.variant}", image_size=arg.image_size, epochs=arg.epochs,
                                lr=2e-3, runlocal=arg.runlocal)
