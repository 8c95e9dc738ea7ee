"""The paper's setting: Vicuna-7B-v1.5 and LLaVA-1.5-7B's language model souped (SoupLM, Bai et al. 2024).

Both are LLaMA-2-7B shapes (``vicuna_7b`` in the zoo: 32 layers, hidden 4096, MLP 11008, 32 heads,
vocabulary 32000) with one tokenizer; LLaVA-1.5's LLM is fine-tuned from Vicuna-v1.5, so the two
share a basin. Give each as an HF LLaMA directory (or GGUF): for LLaVA, its ``model.*`` /
``lm_head`` tensors without ``model.mm_projector.*`` and ``model.vision_tower.*`` (the vision tower
and projector are a later step; they do not enter the soup, which is why the language model can be
souped as is).

Learnable soup on a meta-set (the paper's meta-sets are unpublished; any chat JSONL):

    python -m projects.souplm.train \\
        --config configs/souplm/vicuna_llava.py:granularity=module,experts=/ckpt/vicuna-7b-v1.5+/ckpt/llava-v1.5-7b-lm \\
        --config.input.path=meta.jsonl --workdir runs/soup_module

The vanilla soup grid (t = 0, 0.1, ..., 1; VANILLA_GRID), each a streamed merge:

    for t in 0.0 0.1 ... 1.0; do python -m projects.souplm.merge --method linear \\
        --models /ckpt/vicuna-7b-v1.5 /ckpt/llava-v1.5-7b-lm --weights $(python -c "print(1-$t)") $t \\
        --dtype bfloat16 --out runs/vanilla_$t; done

Memory plan (``python -m projects.souplm.aot``): the K=2 frozen experts in bfloat16 stacked on the
``expert`` axis and FSDP-sharded (``embed`` over ``data``) take 3.14 GiB per device on 8 devices;
alphas and their Adam moments are a few kilobytes (582 logits at per-matrix granularity).
"""
from configs.souplm import lm

VANILLA_GRID = [round(0.1 * i, 1) for i in range(11)]   # weight of the second expert (LLaVA's LM)


def get_config(arg=None):
    arg = lm.common.parse_arg(arg, experts="", granularity="module", reg_uniform=0.0, reg_entropy=0.0, batch_size=64,
                              max_length=2048, steps=500, lr=0.01)
    c = lm.get_config(f"model=vicuna_7b,experts={arg.experts},granularity={arg.granularity},reg_uniform={arg.reg_uniform},"
                      f"reg_entropy={arg.reg_entropy},dataset=chat,max_length={arg.max_length},"
                      f"batch_size={arg.batch_size},steps={arg.steps},lr={arg.lr},fsdp=True")
    c.soup.num_experts = 2
    c.compute_dtype = "bfloat16"                   # bfloat16 compute; the experts are stored as loaded
    c.model.kwargs.param_dtype = "bfloat16"        # frozen 7B experts in bfloat16 (alphas stay float32)
    c.z_loss = 1e-3                                # as LL3M's soupLMM
    c.checkpoint_every = 100
    c.vanilla_grid = VANILLA_GRID
    return c
