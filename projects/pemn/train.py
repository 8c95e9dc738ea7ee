"""Train one PEMN point: ``python -m projects.pemn.train --config configs/pemn/digits.py:strategy=rp --workdir DIR``.

The generic loop trains whatever is an ``nnx.Param`` (scores, norm affine parameters); the frozen
weights are regenerated from the config's seed and not stored in checkpoints. For the whole curve
over strategies and seeds see ``projects.pemn.sweep``.
"""
from lib.train import cli


def run(config, workdir):
    from lib.train import loop
    return loop.run(config, workdir)


if __name__ == "__main__":
    cli.main(run)
