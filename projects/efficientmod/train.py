"""Train or evaluate an EfficientMod: ``python -m projects.efficientmod.train --config CONFIG --workdir DIR``.

Examples:
    python -m projects.efficientmod.train --config configs/efficientmod/digits.py --workdir /tmp/effmod_digits
    python -m projects.efficientmod.train --config configs/efficientmod/imagenet.py:variant=s --workdir DIR
    python -m projects.efficientmod.train --config configs/efficientmod/imagenet.py:variant=s --workdir DIR \\
        --config.init_from=efficientMod_s.pth.tar --config.init_from_ema=True --config.eval_only=True
"""
from lib.train import cli

if __name__ == "__main__":
    cli.main()  # the generic loop (lib.train.loop.run)
