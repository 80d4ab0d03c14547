"""Hyperparameter search on Optuna that survives crashes: ``python -m jaxft.sweep`` (:mod:`.cli`).

Modules: ``space`` (the space file: loading, checking against the schema, applying a trial's values),
``storage`` (where the study lives, opening it, requeueing a killed sweep's trials), ``worker`` (taking
and training trials, reporting top-1 to the pruner), ``results`` (table, CSV, plots, best config),
``cli`` (the coordinator and its worker processes). Needs ``pip install 'jaxft[sweep]'``.
"""

from jaxft import _lazy

__getattr__, __dir__, __all__ = _lazy.attach(__name__, {
    "load_space": ".space", "check_space": ".space", "with_params": ".space", "SpaceError": ".space",
    "open_storage": ".storage", "open_study": ".storage",
}, ("cli", "results", "space", "storage", "worker"))
