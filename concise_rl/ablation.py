"""The variants `concise-rl ablate` runs, by name: parsed before anything heavy is imported.

    ppo-lam{L}-{AGG}   our PPO with the phase-2 settings, GAE lambda L and loss aggregation AGG
    grpo-{LOSS}        TRL's GRPOTrainer with loss_type LOSS, otherwise the phase-2 settings
    band-{LOW}-{HIGH}  our PPO with the phase-2 settings on problems drawn from the curated
                       pass-rate band [LOW, HIGH] instead of the phase-2 set
    logprob-t{T}       our PPO with the phase-2 settings, its log-probs scored at temperature T
                       (ppo.logprob_temperature; logprob-t1.0 is the paper's code's objective)

Names are canonical (``ppo-lam1-token-mean`` reads as ``ppo-lam1.0-token-mean``), so a
variant's folder is found again whichever way it was spelt.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, get_args

from concise_rl.config import PPOConfig

LAMBDAS = (0.95, 1.0)
LOSS_AGG_MODES: tuple[str, ...] = get_args(PPOConfig.model_fields["loss_agg_mode"].annotation)
# TRL's loss types that differ only in how token losses are aggregated (TRL 1.16 has more,
# e.g. cispo and sapo, which change the clipped objective itself).
GRPO_LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo")
DEFAULT_BANDS = ((0.125, 0.375), (0.375, 0.625), (0.625, 0.875))

_NUMBER = r"(\d+(?:\.\d*)?|\.\d+)"
_PPO = re.compile(rf"ppo-lam{_NUMBER}-({'|'.join(map(re.escape, LOSS_AGG_MODES))})")
_GRPO = re.compile(rf"grpo-({'|'.join(GRPO_LOSS_TYPES)})")
_BAND = re.compile(rf"band-{_NUMBER}-{_NUMBER}")
_LOGPROB = re.compile(rf"logprob-t{_NUMBER}")
# The paper's code scored log-probs on raw logits (T = 1) while sampling at 0.6.
PAPER_LOGPROB_TEMPERATURE = 1.0


@dataclass(frozen=True)
class Variant:
    """One phase-2 run of the ablation."""

    kind: Literal["ppo", "grpo", "band", "logprob"]
    lam: float | None = None
    loss_agg_mode: str | None = None
    loss_type: str | None = None
    band: tuple[float, float] | None = None
    logprob_temperature: float | None = None

    @property
    def name(self) -> str:
        if self.kind == "ppo":
            return f"ppo-lam{self.lam}-{self.loss_agg_mode}"
        if self.kind == "grpo":
            return f"grpo-{self.loss_type}"
        if self.kind == "logprob":
            return f"logprob-t{self.logprob_temperature}"
        return f"band-{self.band[0]}-{self.band[1]}"


def default_variants(bands: list[tuple[float, float]] | tuple[tuple[float, float], ...] = DEFAULT_BANDS) -> list[Variant]:
    """Every PPO lambda x aggregation, every GRPO loss type, the paper's log-prob temperature,
    then one PPO run per band."""
    return (
        [Variant("ppo", lam=lam, loss_agg_mode=agg) for lam in LAMBDAS for agg in LOSS_AGG_MODES]
        + [Variant("grpo", loss_type=loss) for loss in GRPO_LOSS_TYPES]
        + [Variant("logprob", logprob_temperature=PAPER_LOGPROB_TEMPERATURE)]
        + [Variant("band", band=band) for band in bands]
    )


def _band(low: str, high: str, where: str) -> tuple[float, float]:
    lo, hi = float(low), float(high)
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"{where}: a pass-rate band needs 0 <= LOW <= HIGH <= 1, got [{lo}, {hi}]")
    return lo, hi


def parse_variant(name: str) -> Variant:
    """One variant from its name; an unknown name is refused with the valid ones listed."""
    if m := _PPO.fullmatch(name):
        lam = float(m.group(1))
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"variant {name!r}: lambda must be in [0, 1], got {lam}")
        return Variant("ppo", lam=lam, loss_agg_mode=m.group(2))
    if m := _GRPO.fullmatch(name):
        return Variant("grpo", loss_type=m.group(1))
    if m := _BAND.fullmatch(name):
        return Variant("band", band=_band(m.group(1), m.group(2), f"variant {name!r}"))
    if m := _LOGPROB.fullmatch(name):
        temperature = float(m.group(1))
        if temperature <= 0:
            raise ValueError(f"variant {name!r}: the log-prob temperature must be above 0, got {temperature}")
        return Variant("logprob", logprob_temperature=temperature)
    valid = ", ".join(v.name for v in default_variants(()))
    raise ValueError(
        f"unknown variant {name!r}; valid: {valid}, band-LOW-HIGH (a pass-rate band, e.g. band-0.125-0.375); "
        f"ppo-lam{{L}}-{{AGG}} takes any lambda L in [0, 1], logprob-t{{T}} any temperature T above 0"
    )


def parse_variants(text: str) -> list[Variant]:
    """A comma-separated list of variant names, in order, duplicates dropped."""
    variants: list[Variant] = []
    for item in text.split(","):
        if item.strip() and (variant := parse_variant(item.strip())) not in variants:
            variants.append(variant)
    if not variants:
        raise ValueError("no variant named; give a comma-separated list such as ppo-lam1.0-token-mean,grpo-dapo")
    return variants


def parse_bands(text: str) -> list[tuple[float, float]]:
    """Pass-rate bands as ``LOW-HIGH,LOW-HIGH``, e.g. ``0.125-0.375,0.625-0.875``."""
    bands = []
    for item in (i.strip() for i in text.split(",")):
        if not item:
            continue
        m = re.fullmatch(rf"{_NUMBER}-{_NUMBER}", item)
        if m is None:
            raise ValueError(f"band {item!r}: expected LOW-HIGH, e.g. 0.125-0.375")
        bands.append(_band(m.group(1), m.group(2), f"band {item!r}"))
    if not bands:
        raise ValueError("no band given; expected LOW-HIGH[,LOW-HIGH...], e.g. 0.125-0.375,0.625-0.875")
    return bands
