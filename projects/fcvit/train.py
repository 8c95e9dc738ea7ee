"""Train or evaluate an FCViT: ``python -m projects.fcvit.train --config CONFIG --workdir DIR``.

Examples:
    python -m projects.fcvit.train --config configs/fcvit/digits.py --workdir /tmp/fcvit_digits
    python -m projects.fcvit.train --config configs/fcvit/imagenet.py:variant=tiny --workdir DIR
    python -m projects.fcvit.train --config configs/fcvit/imagenet.py:variant=b12 --workdir DIR \\
        --config.init_from=fcvit_b12.pth.tar --config.eval_only=True
"""
from lib.train import cli

if __name__ == "__main__":
    cli.main()
