"""Token routing in a generator: the prefill program calibrates per-block thresholds, decode reuses them.

A top-`capacity` choice over the tokens of one call means nothing in decode (one token per sequence)
and couples the sequences of a batch, so both programs decide by threshold (`threshold`): the
prefill's `token-routing` pass calibrates each routed block's threshold at `capacity` on its
calibration prompts (or the example prompt), and the decode pass is given those thresholds as its
`thresholds` option, so the pipeline text spells them and both programs route a token by one rule.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

from .routing import TokenRouting


def prefill_routing(passes: list[Any]) -> list[Any]:
    """The passes with every token-routing pass deciding by threshold (calibrated unless given)."""
    out = []
    for p in passes:
        if isinstance(p, TokenRouting):
            if p.router == "calibrated":
                raise ValueError("token-routing in mode='generate': router 'calibrated' would fit the prefill and "
                                 "the decode program each its own probe; fit once (save_router_weights) and use "
                                 "router 'weights', or router 'norm'")
            p = dataclasses.replace(p, decision="threshold")
        out.append(p)
    return out


def decode_routing(passes: list[Any], thresholds: Optional[list[float]]) -> list[Any]:
    """The prefill's passes with each token-routing pass given the prefill's calibrated thresholds."""
    if thresholds is None or not any(isinstance(p, TokenRouting) for p in passes):
        return passes
    return [dataclasses.replace(p, thresholds=tuple(thresholds)) if isinstance(p, TokenRouting) and
            p.thresholds is None else p for p in passes]


def calibrated_thresholds(pass_stats: dict[str, dict]) -> Optional[list[float]]:
    """The thresholds the prefill's token-routing pass calibrated (its stats' `extra`), if it ran."""
    extra = pass_stats.get(TokenRouting.name, {}).get("extra", {})
    return extra.get("thresholds")


def decode_routing_facts(records: list[Any]) -> dict:
    """Per routed decode block: its threshold and the fraction of the example's decode tokens it routed."""
    return {r.layer: {"threshold": r.details["threshold"], "routed": r.details["kept"], "tokens": r.details["tokens"],
                      "routed_fraction": r.details["routed_fraction"]}
            for r in records if r.op == "sparsecc.route" and r.details.get("decision") == "threshold"}


__all__ = ["calibrated_thresholds", "decode_routing", "decode_routing_facts", "prefill_routing"]
