"""Context Cluster on the embedded handwritten digits (scikit-learn's, offline).

    python -m projects.coc.train --config configs/coc/digits.py --workdir /tmp/coc_digits

coc_tiny's widths, heads and MLP ratios with fewer blocks, at 64x64 (the digits are 8x8, upsampled):
the four stages see 16/8/4/2 points per side. coc_tiny's folds (8, 4, 2, 1) would leave 2x2-point
regions with 2x2 centers, i.e. no clustering at all, so here stage 0 is cut into 2x2 regions of
8x8 points with 2x2 centers each, stages 1-2 cluster the whole map around 2x2 centers, and the
2x2-point last stage around one center.
"""
from configs import common


def get_config(arg=None):
    arg = common.parse_arg(arg, image_size=64, epochs=15, runlocal=False)
    c = common.base_config()
    c.model.name = "coc_tiny"
    c.model.kwargs.depths = (1, 1, 2, 1)
    c.model.kwargs.fold = (2, 1, 1, 1)
    c.model.kwargs.proposal = (2, 2, 2, 1)
    c.num_classes = 10
    c.input.dataset = "digits"
    c.input.image_size = arg.image_size
    c.input.crop_pct = 1.0
    c.input.scale = (0.6, 1.0)             # digits fill the frame: crop gently
    c.input.hflip = 0.0                    # a flipped digit is another digit
    c.input.batch_size = 64
    c.lr, c.min_lr, c.warmup_epochs, c.cooldown_epochs = 2e-3, 1e-6, 2, 0
    c.total_epochs = arg.epochs
    c.schedule_per_epoch = False
    c.mixup.mixup_alpha = c.mixup.cutmix_alpha = 0.0
    c.label_smoothing = 0.1
    c.log_every = 50
    c.checkpoint_every = 200
    if arg.runlocal:
        c.total_epochs, c.warmup_epochs, c.input.batch_size, c.log_every = 1, 0, 32, 5
    return c
