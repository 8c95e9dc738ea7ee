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
    c = common.digits_config(model="coc_tiny", image_size=arg.image_size, epochs=arg.epochs, lr=2e-3, min_lr=1e-6,
                             runlocal=arg.runlocal)
    c.model.kwargs.depths = (1, 1, 2, 1)
    c.model.kwargs.fold = (2, 1, 1, 1)
    c.model.kwargs.proposal = (2, 2, 2, 1)
    return c
