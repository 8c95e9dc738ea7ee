"""The paper's 2-D toy: ``--config configs/starnet/toy2d.py:mode=mul`` (or sum, or both).

Trains the 2-D DemoNet on make_moons(100, noise 0.4) as the official ``2D_visual/main.py`` does
(trunc_normal(0.02) Linears, SGD with weight decay on every parameter, gradient norm clipped to 1.0,
last partial batch dropped) over several seeds, prints the train accuracy and saves
``decision_boundary.png`` in the workdir. ``grad_clip=0``, ``drop_last=False``,
``decay_1d_params=False`` and ``init="torch"`` give the library's earlier (non-official) training.
"""
import ml_collections

from configs import common


def get_config(arg=None):
    arg = common.parse_arg(arg, mode="both", seeds=5)
    if arg.mode not in ("mul", "sum", "both"):
        raise ValueError(f"mode must be mul, sum or both, got {arg.mode!r}")
    return ml_collections.ConfigDict(dict(
        task="toy2d", mode=arg.mode, seeds=arg.seeds, n_samples=100, noise=0.4, data_seed=0,
        epochs=30, batch_size=32, lr=0.1, min_lr=0.005, momentum=0.9, wd=2e-4, label_smoothing=0.1,
        grad_clip=1.0, drop_last=True, decay_1d_params=True, init="trunc_normal"))
