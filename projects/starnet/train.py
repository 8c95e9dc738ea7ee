"""Train or evaluate a StarNet: ``python -m projects.starnet.train --config CONFIG --workdir DIR``.

Examples:
    python -m projects.starnet.train --config configs/starnet/digits.py --workdir /tmp/digits
    python -m projects.starnet.train --config configs/starnet/imagenet.py:variant=s1 --workdir DIR
    python -m projects.starnet.train --config configs/starnet/imagenet.py:variant=s1 --workdir DIR \\
        --config.init_from=starnet_s1.pth.tar --config.eval_only=True
"""
from lib.train import cli

if __name__ == "__main__":
    cli.main()
