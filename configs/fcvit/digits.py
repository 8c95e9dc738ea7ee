"""FCViT-tiny on the embedded handwritten digits (scikit-learn's, offline).

    python -m projects.fcvit.train --config configs/fcvit/digits.py --workdir /tmp/fcvit_digits

At 32x32 the stride-4 stem and three reducers leave maps of 8, 4, 2 and 1 pixels per side: the
11x11 depthwise convs then see the whole map, and the global context's statistics (over 8 heads x
pixels) stay defined down to the 1x1 map.
"""
from configs import common


def get_config(arg=None):
    arg = common.parse_arg(arg, variant="tiny", image_size=32, epochs=30, runlocal=False)
    c = common.base_config()
    c.model.name = f"fcvit_{arg.variant}"
    c.num_classes = 10
    c.input.dataset = "digits"
    c.input.image_size = arg.image_size
    c.input.crop_pct = 1.0
    c.input.scale = (0.6, 1.0)             # digits fill the frame: crop gently
    c.input.hflip = 0.0                    # a flipped digit is another digit
    c.input.batch_size = 64
    c.lr, c.min_lr, c.warmup_epochs, c.cooldown_epochs = 2e-3, 1e-5, 2, 0
    c.total_epochs = arg.epochs
    c.schedule_per_epoch = False
    c.mixup.mixup_alpha = c.mixup.cutmix_alpha = 0.0
    c.label_smoothing = 0.1
    c.log_every = 50
    c.checkpoint_every = 200
    if arg.runlocal:
        c.total_epochs, c.warmup_epochs, c.input.batch_size, c.log_every = 1, 0, 32, 5
    return c
