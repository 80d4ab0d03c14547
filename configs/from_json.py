"""Runs a config saved as JSON: a sweep's ``best_config.json`` or any workdir's ``config.json``.

    python -m jaxft.train --config configs/from_json.py:runs/tiny_sweep/best_config.json --workdir runs/best

Every key must be in the schema (the config is locked), as with any other config file.
"""

import json
from pathlib import Path

import ml_collections

from jaxft import config


def get_config(path: str) -> ml_collections.ConfigDict:
  c = config.default_config()
  c.update(json.loads(Path(path).read_text(encoding="utf-8")))
  return c
