"""Train or evaluate a Context Cluster: ``python -m projects.coc.train --config CONFIG --workdir DIR``.

Examples:
    python -m projects.coc.train --config configs/coc/digits.py --workdir /tmp/coc_digits
    python -m projects.coc.train --config configs/coc/imagenet.py:variant=tiny --workdir DIR
    python -m projects.coc.train --config configs/coc/imagenet.py:variant=tiny_plain --workdir DIR \\
        --config.init_from=coc_tiny_plain.pth.tar --config.eval_only=True
"""
from lib.train import cli, loop

if __name__ == "__main__":
    cli.main(loop.run)
