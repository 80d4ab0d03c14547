"""The main job survives a hard crash (kill -9: exact resume, no stale workdir lock) and names missing
weights clearly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jaxft import checkpoint, paths

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
  root = tmp_path_factory.mktemp("data") / "tiny"
  rs = np.random.RandomState(1)
  for name, colour in [("blue", (20, 40, 200)), ("red", (200, 30, 20))]:
    (root / name).mkdir(parents=True)
    for i in range(12):
      img = np.clip(np.array(colour) + rs.randint(-40, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
      Image.fromarray(img).save(root / name / f"{i:03d}.png")
  return root


# The streaming pipeline, host crops in grain threads (with --config.data.workers=2 the CLI's spawned
# workers pass this test too, but take ~3x as long on 2 cores; tests/test_stream.py checks that the
# worker count changes no batch).
STREAM = ("--config.data.pipeline=stream", "--config.data.image_size=32")


def _args(folder: Path, tmp: Path, workdir: Path, steps: int, extra: tuple[str, ...] = ()) -> list[str]:
  return [sys.executable, "-m", "jaxft.train", "--config", "configs/tiny.py",
          f"--config.data.source=folder:{folder}", f"--config.data.cache_dir={tmp / 'cache'}",
          f"--config.train.num_steps={steps}", "--config.train.checkpoint_every=2",
          "--config.train.eval_every=0", "--workdir", str(workdir), *extra]


def _variables(workdir: Path) -> dict[str, np.ndarray]:
  return {k: np.asarray(v) for k, v in paths.flatten(checkpoint.load_model(workdir).variables).items()}


@pytest.mark.slow
@pytest.mark.parametrize("extra", [(), STREAM], ids=["memory", "stream"])
def test_kill_9_then_rerun_gives_the_uninterrupted_result(folder, tmp_path, extra):
  steps = 40
  straight = tmp_path / "straight"
  r = subprocess.run(_args(folder, tmp_path, straight, steps, extra), cwd=REPO, capture_output=True,
                     text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]

  crashed = tmp_path / "crashed"
  proc = subprocess.Popen(_args(folder, tmp_path, crashed, steps, extra), cwd=REPO,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  ckpts = crashed / "checkpoints"
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if ckpts.is_dir() and any(p.name.isdigit() and int(p.name) >= 4 for p in ckpts.iterdir()):
      break
    time.sleep(0.05)
  assert proc.poll() is None, "the run finished before it could be killed; raise num_steps"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  done = sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
  assert done and done[-1] < steps
  # The killed run's lock file is left behind naming it, but its flock died with it: no stale lock.
  assert f"pid {proc.pid} " in (crashed / ".lock").read_text()

  r = subprocess.run(_args(folder, tmp_path, crashed, steps, extra), cwd=REPO, capture_output=True,
                     text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "resuming" in r.stderr
  assert json.loads(r.stdout.strip().splitlines()[-1])["step"] == steps
  # The records of the steps after the resumed checkpoint are written once, by the rerun.
  train = [json.loads(l)["step"] for l in (crashed / "metrics.jsonl").read_text().splitlines()
           if json.loads(l)["split"] == "train"]
  assert train == list(range(1, steps + 1))
  a, b = _variables(straight), _variables(crashed)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_missing_weights_is_one_clear_error(folder, tmp_path):
  args = _args(folder, tmp_path, tmp_path / "run", 2) + ["--config.model.pretrained=/no/such/weights"]
  r = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert r.returncode == 2
  assert "config.model.pretrained = '/no/such/weights': no such file or directory" in r.stderr
  assert "tools/convert_torch_weights.py" in r.stderr
