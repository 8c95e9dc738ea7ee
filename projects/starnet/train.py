"""Train or evaluate a StarNet: ``python -m projects.starnet.train --config CONFIG --workdir DIR``.

Examples:
    python -m projects.starnet.train --config configs/starnet/digits.py --workdir /tmp/digits
    python -m projects.starnet.train --config configs/starnet/imagenet.py:variant=s1 --workdir DIR
    python -m projects.starnet.train --config configs/starnet/imagenet.py:variant=s1 --workdir DIR \\
        --config.init_from=starnet_s1.pth.tar --config.eval_only=True
"""
from lib.train import cli


def run(config, workdir):
    if config.get("task") == "toy2d":  # the paper's 2-D toy has its own tiny trainer
        from projects.starnet import toy2d
        return toy2d.run(config, workdir)
    from lib.train import loop
    return loop.run(config, workdir)


if __name__ == "__main__":
    cli.main(run)
