"""Multi-task heads: extra heads trained on labels mapped from the main dataset's classes."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from jaxft.train.errors import TrainError

TASK_KEYS = ("name", "classes", "label_map", "weight", "dropout")


@dataclasses.dataclass(frozen=True)
class Task:
  """An extra head trained on labels mapped from the main dataset's classes.

  Attributes:
    name: the head's name (``head_<name>`` in the params).
    classes: the task's class names; label ``i`` is ``classes[i]``.
    label_table: for each main class index, the task label (``label_table[main_label]``).
    weight: the weight of its cross-entropy in the loss.
  """

  name: str
  classes: tuple[str, ...]
  label_table: tuple[int, ...]
  weight: float

  @property
  def num_classes(self) -> int:
    return len(self.classes)

  def labels(self, main_labels: np.ndarray) -> np.ndarray:
    """The task labels of examples whose main labels are ``main_labels`` (a new int32 array)."""
    return np.asarray(self.label_table, np.int32)[np.asarray(main_labels)]


def build_tasks(task_configs: Any, class_names: tuple[str, ...]) -> tuple[Task, ...]:
  """Returns the :class:`Task` of each ``config.tasks`` entry, checked against the data's classes.

  Each entry is a dict ``{"name", "classes", "label_map", "weight"[, "dropout"]}`` where ``label_map``
  maps every main class name to one of ``classes``. Every batch carries labels for every task (they are
  functions of the main label), so the batches of all tasks are the main dataset's batches. The entries
  are not mutated.

  Raises:
    TrainError: a main class missing from ``label_map``, an unknown target class, unknown keys.
  """
  out = []
  for t in task_configs:
    t = dict(t)
    unknown = set(t) - set(TASK_KEYS)
    if unknown:
      raise TrainError(f"task {t.get('name')!r}: unknown keys {sorted(unknown)}; valid: "
                       f"{', '.join(TASK_KEYS)}")
    classes = tuple(t["classes"])
    label_map = dict(t["label_map"])
    missing = [c for c in class_names if c not in label_map]
    bad = sorted({str(v) for v in label_map.values() if v not in classes})
    if missing or bad:
      raise TrainError(f"task {t['name']!r}: label_map must map every class of the data "
                       f"{list(class_names)} to one of {list(classes)}; missing {missing}, unknown "
                       f"targets {bad}")
    out.append(Task(name=t["name"], classes=classes,
                    label_table=tuple(classes.index(label_map[c]) for c in class_names),
                    weight=float(t.get("weight", 1.0))))
  return tuple(out)


def tasks_meta(tasks: tuple[Task, ...], class_names: tuple[str, ...]) -> dict[str, Any]:
  """The ``meta['tasks']`` stored with the model, so that its extra heads can be read without the
  config: ``{name: {'classes', 'label_of_class'}}``."""
  return {t.name: {"classes": list(t.classes),
                   "label_of_class": dict(zip(class_names, (t.classes[i] for i in t.label_table)))}
          for t in tasks}
