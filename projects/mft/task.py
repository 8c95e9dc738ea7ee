"""Mask Fine-Tuning as a task: the causal-LM loss, with the chosen layers masked and only the
scores trained (``config.task = "mft"``; registered when this module is imported).

The model arrives as the loop builds it (the zoo architecture with the fully fine-tuned weights of
``init_from``); :meth:`MaskFineTuning.wrap` masks the seven projections of ``config.mft.layers``
over those weights. The trainable filter keeps everything but the scores frozen: no gradient, no
optimizer state, not in checkpoints (their sha256 manifest is checked on resume instead).
"""
from __future__ import annotations

import dataclasses

from flax import nnx

from lib.tasks import register_task
from lib.tasks.causal_lm import CausalLM
from projects.mft import masking


@dataclasses.dataclass(frozen=True)
class MaskSettings:
    layers: tuple[int, ...]
    subnet_mode: str = "both"         # "attn" | "mlp" | "both"
    keep: float = 0.9                 # upstream's `sparsity`: the fraction KEPT per matrix
    mode: str = "topk"                # "topk" (upstream "local") | "threshold" (upstream "global")
    threshold_attn: float = 0.0
    threshold_mlp: float = 0.0

    def __post_init__(self):
        if self.subnet_mode not in masking.SUBNET_MODES:
            raise ValueError(f"mft.subnet_mode {self.subnet_mode!r}: expected one of {sorted(masking.SUBNET_MODES)}")
        if self.mode == "topk" and not 0.0 < self.keep <= 1.0:
            raise ValueError(f"mft.keep is the fraction of each matrix kept, in (0, 1]; got {self.keep}")
        if not self.layers:
            raise ValueError("mft.layers is empty: name the decoder layers to mask, e.g. (4, 5, 6, 7)")

    @classmethod
    def from_config(cls, c) -> "MaskSettings":
        return cls(layers=tuple(int(i) for i in c.layers), subnet_mode=c.get("subnet_mode", "both"),
                   keep=float(c.get("keep", 0.9)), mode=c.get("mode", "topk"),
                   threshold_attn=float(c.get("threshold_attn", 0.0)),
                   threshold_mlp=float(c.get("threshold_mlp", 0.0)))


def only_scores(path, value) -> bool:
    return path and path[-1] == "scores"


class MaskFineTuning(CausalLM):
    trainable = nnx.All(nnx.Param, only_scores)

    def __init__(self, settings: MaskSettings, *, z_loss: float = 0.0):
        super().__init__(z_loss=z_loss)
        self.settings = settings

    def wrap(self, model, rngs: nnx.Rngs):
        s = self.settings
        return masking.mask_layers(model, s.layers, subnet_mode=s.subnet_mode, keep=s.keep, mode=s.mode,
                                   threshold_attn=s.threshold_attn, threshold_mlp=s.threshold_mlp, rngs=rngs)


def from_config(config, *, mesh=None, sharding_rules=()) -> MaskFineTuning:
    return MaskFineTuning(MaskSettings.from_config(config.mft), z_loss=config.get("z_loss", 0.0))


register_task("mft", from_config)
