"""Layer 2 (store): PURE: expert parallelism: which routed-expert tensors a rank pulls, and how.

With expert parallelism (vLLM ``enable_expert_parallel``, SGLang ``--ep-size``) an engine keeps whole experts per
rank (its MoE layers run with a TP size of 1) and only the experts it owns. The engine's own placement (vLLM:
each ``FusedMoE``'s ``expert_map``) decides which: it reaches the plan as an :data:`Experts` predicate, and a rank
then pulls ALL chunks of the experts it owns (the whole tensor) and none of the others'. Nothing is re-published:
the store's grid already holds every expert's chunks, and a whole tensor is all of them.

Routed experts are recognised by name: a per-expert tensor names its expert (``...experts.N.w1.weight``,
``...experts.N.gate_proj.weight``); a 3-D fused expert tensor (``...experts.gate_up_proj`` ``[E, 2I, H]``) holds
all experts in one tensor whose chunks each span every expert, so a rank cannot verify one expert's part of a
chunk: it pulls the fused tensor whole (every chunk, verified) and the engine keeps its experts' rows, as vLLM's
own ``enable_ep_weight_filter`` does for such checkpoints. Shared experts (``shared_expert.``,
``shared_experts.``) and routers are not routed experts: they follow their rules (TP or replicated) as without EP.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Iterable, Mapping

from ..errors import ConfigError

Experts = Callable[[str, int], bool]
"""``experts(name, expert)``: whether this rank holds routed expert ``expert`` (the global id the checkpoint name
``name`` carries). Given to a plan, it turns on expert parallelism: a held expert's tensors are pulled whole, the
others not at all."""

_PER_EXPERT = re.compile(r"(?:^|\.)experts\.(\d+)\.")
_FUSED = re.compile(r"(?:^|\.)experts\.[^.]+(?:\.weight)?$")


def expert_of(name: str) -> int | None:
    """The routed expert a per-expert checkpoint tensor belongs to (None: not a per-expert tensor)."""
    match = _PER_EXPERT.search(name)
    return int(match.group(1)) if match else None


def layer_of(name: str) -> str | None:
    """The MoE module a routed-expert tensor belongs to, as its name prefix ending in ``experts``
    (``model.layers.3.mlp.experts``); None for any other tensor."""
    match = _PER_EXPERT.search(name) or _FUSED.search(name)
    return name[: name.index("experts", match.start()) + len("experts")] if match else None


def is_fused(name: str, shape: Collection[int]) -> bool:
    """A 3-D fused expert tensor (all experts of a layer in one ``[E, ...]`` tensor)."""
    return len(shape) == 3 and _PER_EXPERT.search(name) is None and _FUSED.search(name) is not None


def pull_whole(name: str, shape: Collection[int], experts: Experts) -> bool | None:
    """What a rank under expert parallelism does with a tensor: True, pull it whole (an expert it holds, or a
    fused expert tensor); False, skip it (another rank's expert); None, as without EP (not a routed expert)."""
    expert = expert_of(name)
    if expert is not None:
        return bool(experts(name, expert))
    return True if is_fused(name, shape) else None


def owned_by_layer(placement: Mapping[str, Collection[int]], fallback: Collection[int] | None = None) -> Experts:
    """An :data:`Experts` predicate from the experts each MoE module holds, keyed by :func:`layer_of` prefixes.
    A layer not in ``placement`` holds ``fallback`` (None: every expert, i.e. pulled whole: costs bytes, never
    correctness, since the engine skips experts it does not hold)."""
    held = {layer: frozenset(ids) for layer, ids in placement.items()}
    default = None if fallback is None else frozenset(fallback)

    def holds(name: str, expert: int) -> bool:
        ids = held.get(layer_of(name) or "", default)
        return ids is None or expert in ids

    return holds


def contiguous(num_experts: int, ep: int, rank: int) -> range:
    """The experts rank ``rank`` of ``ep`` holds under a linear placement (vLLM's default): ``[r*E/ep,
    (r+1)*E/ep)``. For tests and sizing; engines give their own placement."""
    if ep < 1 or num_experts % ep:
        raise ConfigError(f"{num_experts} experts cannot be placed evenly on ep={ep} ranks: give an ep that divides "
                          f"{num_experts}")
    per = num_experts // ep
    return range(rank * per, (rank + 1) * per)


def check_ep(ep: int, tp: int) -> None:
    """An expert-parallel size goes with a tp it is a multiple of (vLLM: ep = tp x data_parallel_size; rank r
    holds the dense tensors of TP rank r % tp)."""
    if ep < 1 or ep % tp:
        raise ConfigError(f"ep={ep} must be a positive multiple of tp={tp} (vLLM's ep = tp x data_parallel_size)")


def linear(names: Iterable[str], ep: int, rank: int) -> Experts:
    """Rank ``rank``'s experts under vLLM's default (linear) placement of every MoE layer's routed experts over
    ``ep`` ranks, the layer's expert count read from the checkpoint names (sizing: ``inspect --ep``)."""
    counts: dict[str, int] = {}
    for name in names:
        expert = expert_of(name)
        if expert is not None:
            layer = layer_of(name) or ""
            counts[layer] = max(counts.get(layer, 0), expert + 1)
    return owned_by_layer({layer: contiguous(count, ep, rank) for layer, count in counts.items()}, fallback=())
