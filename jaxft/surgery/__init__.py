"""Structural edits of a :class:`~jaxft.models.Model` as pure functions.

Every op has the shape ``op(model, …, *, seed=0, expect=None) -> Model`` and:

* never mutates ``model`` (nor its spec, variables, meta or history);
* edits the spec with ``dataclasses.replace`` and builds new variable dicts that share — as the very
  same array objects — every leaf it does not touch;
* takes new parameters from ``Network(new_spec).init`` (seeded by an integer ``seed``), so surgery never
  duplicates model code: a new block kind works as soon as the network can build it and, for the ops that
  need to know which BN closes a residual branch or which channels are "inner", it is described in
  :data:`BLOCK_KINDS`;
* appends one JSON-serialisable record ``{"op": name, "args": {...}}`` to ``model.history``, so
  :func:`replay` can rebuild the same structure on the base model and :func:`apply_ops` can apply
  records written in a config.

Blocks are addressed as ``"<stage>/<block>"`` (``layer2/block1``); selectors are regexes matched against
whole block names (``jaxft.paths.glob`` turns shell patterns into them). A selector that matches nothing
or a number of blocks other than ``expect``, and an unknown stage, block or head, raise
:class:`~jaxft.paths.PathError` naming the nearest valid names.

Modules (each public name below is importable from ``jaxft.surgery`` itself):

* :mod:`~jaxft.surgery.ops` — the ops (graft, replace, remove, prune; dropout and BN momentum).
* :mod:`~jaxft.surgery.widening` — Net2WiderNet widening, function-preserving: :func:`widen` (blocks'
  inner channels), :func:`widen_stage` (residual streams: stage widths).
* :mod:`~jaxft.surgery.lora` — :func:`add_lora`, :func:`merge_lora` (low-rank conv updates).
* :mod:`~jaxft.surgery.fold` — :func:`fold_batchnorm` (BatchNorm folded into the convs, for deployment).
* :mod:`~jaxft.surgery.history` — :data:`REGISTRY` (ops by recorded name), :func:`replay`,
  :func:`apply_ops`.
* :mod:`~jaxft.surgery.inspect` — :func:`count_params`, :func:`count_flops`, :func:`report`,
  :func:`diff`.
* :mod:`~jaxft.surgery.rebuild` — the variables of an op's result (shared, given or freshly initialised
  leaves) and its history record.
* :mod:`~jaxft.surgery.select` — addressing stages, blocks and heads of a spec by name.
* :mod:`~jaxft.surgery.kinds` — :data:`BLOCK_KINDS`, what the ops need to know about each block kind.

The submodules are imported on first use of one of their names (PEP 562), so ``import jaxft.surgery``
is cheap.
"""

from __future__ import annotations

from jaxft import _lazy

from jaxft.paths import PathError  # re-exported: every op raises it

# public name → the submodule defining it
_EXPORTS: dict[str, str] = {
    "BLOCK_KINDS": "kinds", "BlockKind": "kinds", "InnerGroup": "kinds",
    "block_names": "select",
    "add_adapters": "ops", "add_head": "ops", "append_blocks": "ops", "prune_channels": "ops",
    "remove_blocks": "ops", "remove_stage": "ops", "replace_activation": "ops", "replace_block": "ops",
    "replace_head": "ops", "replace_stage": "ops", "set_bn_momentum": "ops", "set_dropout": "ops",
    "widen": "widening", "widen_stage": "widening",
    "add_lora": "lora", "merge_lora": "lora", "fold_batchnorm": "fold",
    "DiffResult": "inspect", "Report": "inspect", "count_flops": "inspect", "count_params": "inspect",
    "diff": "inspect", "report": "inspect",
    "REGISTRY": "history", "apply_ops": "history", "replay": "history",
}

__getattr__, __dir__, _names = _lazy.attach(__name__, {k: '.' + v for k, v in _EXPORTS.items()},
                                             set(_EXPORTS.values()) | {"rebuild"})
__all__ = sorted([*_names, "PathError"])
