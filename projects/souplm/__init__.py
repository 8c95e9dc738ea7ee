"""SoupLM: weight soups (fixed, greedy, learnable) of models fine-tuned from one base; streamed merges
of HF/GGUF checkpoints. The library parts are ``lib.soup`` and ``lib.merge``; this package holds the
commands (``train``, ``merge``) and the demonstrations (``vision``, ``language``, ``aot``)."""
