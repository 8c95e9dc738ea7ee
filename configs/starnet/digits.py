"""StarNet on the embedded handwritten digits (scikit-learn's, offline): the `make demo` job.

    python -m projects.starnet.train --config configs/starnet/digits.py --workdir /tmp/digits
"""
from configs import common


def get_config(arg=None):
    arg = common.parse_arg(arg, variant="s050", image_size=32, epochs=30, runlocal=False)
    return common.digits_config(model=f"starnet_{arg.variant}", image_size=arg.image_size, epochs=arg.epochs,
                                lr=4e-3, runlocal=arg.runlocal)
