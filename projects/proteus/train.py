"""Proteus distillation: ``python -m projects.proteus.train --config CONFIG --workdir DIR``.

Examples:
    python -m projects.proteus.train --config configs/proteus/digits.py --workdir /tmp/proteus_digits
    python -m projects.proteus.train --config configs/proteus/imagenet.py:student=l --workdir DIR \\
        --config.proteus.teacher_weights=dinov2_vitg14_pretrain.pth

The run's ``best/`` holds the student backbone alone (the heads are dropped);
``python -m projects.proteus.export`` writes it with the official DINOv2 key names.
"""
import lib.tasks.proteus  # noqa: F401  (registers the "proteus" task)
from lib.train import cli


def run(config, workdir):
    from lib.train import loop
    return loop.run(config, workdir)


if __name__ == "__main__":
    cli.main(run)
