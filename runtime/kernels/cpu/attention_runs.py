"""Planning full-block runs of a block-sparse layout into few, batched flash-attention calls.

A query block's fully visible key blocks form runs of consecutive blocks; runs
longer than a chunk are cut from their end. Runs that move with their query
block (the causal staircase: a band) or that several query blocks share (a
column) become one call each (see `Run`).
"""
from __future__ import annotations

from collections import defaultdict
from typing import NamedTuple


class Run(NamedTuple):
    """Key blocks [start + i*key_step, +length) for query blocks first + i*q_step, i < count."""
    first: int
    q_step: int
    start: int
    key_step: int
    length: int
    count: int


def runs_of(indices: list[int]) -> list[tuple[int, int]]:
    """(start, length) of the maximal runs of consecutive block numbers in an ascending list."""
    runs: list[list[int]] = []
    for block in indices:
        if runs and runs[-1][0] + runs[-1][1] == block:
            runs[-1][1] += 1
        else:
            runs.append([block, 1])
    return [(start, length) for start, length in runs]


def _cut(start: int, length: int, chunk: int) -> list[tuple[int, int]]:
    """[start, start+length) as chunk-block pieces counted from its end (the remainder first)."""
    rest = length % chunk
    pieces = [(start, rest)] if rest else []
    return pieces + [(s, chunk) for s in range(start + rest, start + length, chunk)]


def progressions(members: list[tuple[int, int]], band: bool) -> list[tuple[int, int, int, int]]:
    """(first block, start, q step, count) of greedy maximal progressions of sorted (block, start)."""
    groups: list[list[tuple[int, int]]] = []
    for qb, start in members:
        group = groups[-1] if groups else None
        step = qb - group[-1][0] if group else 0
        if group and (len(group) == 1 or step == group[1][0] - group[0][0]) \
                and start - group[-1][1] == (step if band else 0):
            group.append((qb, start))
        else:
            groups.append([(qb, start)])
    return [(g[0][0], g[0][1], g[1][0] - g[0][0] if len(g) > 1 else 1, len(g)) for g in groups]


def plan_runs(full_counts: list[int], full_indices: list[list[int]], chunk: int) -> list[Run]:
    """Group the full runs of all query blocks into batched calls: bands first, then shared columns."""
    pieces = [(qb, s, n) for qb, (count, indices) in enumerate(zip(full_counts, full_indices))
              for start, length in runs_of(indices[:count]) for s, n in _cut(start, length, chunk)]
    plan, by_band, by_column = [], defaultdict(list), defaultdict(list)
    for qb, s, n in pieces:
        by_band[(qb - s, n)].append((qb, s))
    for (_, length), members in by_band.items():
        for qb, s, q_step, count in progressions(members, band=True):
            if count > 1 and q_step == 1:
                plan.append(Run(qb, 1, s, 1, length, count))
            else:
                by_column[(s, length)].extend((qb + i * q_step, s + i * q_step) for i in range(count))
    for (start, length), members in by_column.items():
        for qb, s, q_step, count in progressions(sorted(members), band=False):
            plan.append(Run(qb, q_step, s, 0, length, count))
    return plan
