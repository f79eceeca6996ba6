"""The precision training keeps its weights in, and the one it computes in.

``model.dtype`` names the compute precision. Trainable weights and their AdamW states
are always kept in float32, as the paper's DeepSpeed bf16 runs kept them: at the
paper's actor learning rate (5e-7) an AdamW step changes a bf16 weight of size 0.02 by
about 1/200 of its last bit, so pure-bf16 training rounds almost every update away.

- Without DeepSpeed the trainer does it by hand: float32 parameters and optimizer
  states, every forward under ``torch.autocast`` in ``model.dtype``, and a ``model.dtype``
  copy of the policy for sampling, refreshed from the float32 weights before each rollout.
- Under DeepSpeed, its bf16 mode does the same (bf16 module weights, float32 master
  weights and optimizer partitions), so the models are loaded in ``model.dtype`` and
  DeepSpeed keeps the master copy. The launcher's precision must then agree with
  ``model.dtype``: DeepSpeed's config, not this code, decides what it stores.

float16 needs loss scaling, which the trainer does not do, so it is refused for
training (it stays valid for sampling and evaluation).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from concise_rl.errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# accelerate's name for the mixed precision that computes in each dtype.
LAUNCHER_PRECISION = {"float32": "no", "bfloat16": "bf16", "float16": "fp16"}


@dataclass(frozen=True)
class Precision:
    """How one training run stores and computes.

    ``compute``: the dtype forwards run in (``model.dtype``); ``load``: the dtype the
    trainable models are loaded in (float32 master weights, or ``model.dtype`` when
    DeepSpeed keeps the master copy itself).
    """

    compute: torch.dtype
    load: torch.dtype
    deepspeed: bool

    @property
    def mixed(self) -> bool:
        return self.compute != torch.float32

    @property
    def sampling_copy(self) -> bool:
        """Whether rollouts sample from a ``compute``-dtype copy of float32 weights (no DeepSpeed)."""
        return self.mixed and not self.deepspeed

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        """Forwards in ``compute`` over float32 weights; nothing under DeepSpeed or in float32."""
        if not self.mixed or self.deepspeed:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.compute)


def training_precision(dtype: str, launcher_precision: str, *, deepspeed: bool) -> Precision:
    """The precision of a training run with ``model.dtype`` = ``dtype`` under a launcher's mixed precision.

    ``launcher_precision`` is accelerate's (``no``, ``bf16``, ``fp16``), from
    ``accelerate launch --mixed_precision`` or its config file. Without DeepSpeed the
    trainer autocasts itself, so the launcher may say ``no`` or the same precision; a
    launcher asking for another precision than the config is refused rather than
    silently obeyed or ignored.
    """
    if dtype == "float16":
        raise ConfigError(
            "model.dtype float16 cannot train: float16 gradients need loss scaling, which the trainer does not do; "
            "set model.dtype: bfloat16 (float32 master weights, bf16 compute, as the paper) or float32"
        )
    wanted = LAUNCHER_PRECISION[dtype]
    allowed = {wanted} if deepspeed else {wanted, "no"}
    if launcher_precision not in allowed:
        how = "DeepSpeed's precision" if deepspeed else "the launcher's mixed precision"
        raise ConfigError(
            f"model.dtype is {dtype} but {how} is {launcher_precision!r} (accelerate launch --mixed_precision, or "
            f"mixed_precision in its config file); the two must agree: launch with --mixed_precision {wanted} "
            f"or set model.dtype to match"
        )
    compute = DTYPES[dtype]
    return Precision(compute=compute, load=compute if deepspeed else torch.float32, deepspeed=deepspeed)
