"""Any task through the generic loop: ``python -m lib.train --config CONFIG --workdir DIR``.

Projects with their own entry point (``python -m projects.<paper>.train``) call the same loop; this
one serves configs that need no project code, such as LLM fine-tuning (``configs/llama/sft.py``).
"""
from lib.train import cli, loop

if __name__ == "__main__":
    cli.main(loop.run)
