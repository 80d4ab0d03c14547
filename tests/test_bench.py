"""The benchmark tools run end to end on a tiny workload and describe the real networks."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import bench_conv_passes  # noqa: E402  pylint: disable=wrong-import-position


def test_resnet50_conv_list_matches_torchvision_flops():
  convs = bench_conv_passes.resnet50_convs(224)
  assert sum(n for *_, n in convs) == 53  # 1 stem + 16 blocks × 3 + 4 downsamples
  macs = sum(n * ((h + 2 * (k // 2) - k) // s + 1) ** 2 * cin * cout * k * k
             for h, cin, cout, k, s, n in convs)
  assert abs(macs / 4.087e9 - 1) < 0.01  # torchvision ResNet-50: 4.09 GMACs in its convolutions


@pytest.mark.slow
def test_bench_fold_runs_and_writes_the_ratio(tmp_path):
  out = tmp_path / "f.json"
  cmd = [sys.executable, os.path.join(ROOT, "tools", "bench_fold.py"), "--model", "cifar_resnet8",
         "--sizes", "32", "--batch", "2", "--steps", "1", "--json", str(out)]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  (rec,) = json.loads(out.read_text())
  assert rec["size"] == 32 and rec["folded_images_per_s"] > 0 and rec["unfolded_images_per_s"] > 0
  assert abs(rec["ratio"] - rec["folded_images_per_s"] / rec["unfolded_images_per_s"]) < 1e-9
  assert "ratio" in proc.stdout


def test_bench_startup_times_both_checkouts_and_prints_the_ratio(tmp_path):
  # This checkout against itself: both columns are filled and the ratio is theirs.
  cmd = [sys.executable, os.path.join(ROOT, "tools", "bench_startup.py"), "--baseline", ROOT,
         "--runs", "1", "--steps", "1"]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  medians = {line.split(" median")[0].strip(): float(line.split("median")[1].split()[0])
             for line in proc.stdout.splitlines() if " median " in line}
  assert set(medians) == {"this checkout", "baseline"} and min(medians.values()) > 0
  ratio = float(proc.stdout.split("baseline / this checkout: ")[1].split("x")[0])
  assert abs(ratio - medians["baseline"] / medians["this checkout"]) < 0.01 + 0.01 * ratio
  bad = subprocess.run([*cmd[:3], str(tmp_path)], capture_output=True, text=True, timeout=120)
  assert bad.returncode == 2 and "is not a jaxft checkout" in bad.stderr


@pytest.mark.parametrize("with_torch", [False, True])
def test_bench_runs_and_writes_ratios(tmp_path, with_torch):
  if with_torch:
    pytest.importorskip("torch")
  out = tmp_path / "b.json"
  cmd = [sys.executable, os.path.join(ROOT, "tools", "bench.py"), "--models", "cifar_resnet8",
         "--sizes", "32", "--batch", "8", "--steps", "2", "--warmup", "1", "--json", str(out)]
  if not with_torch:
    cmd.append("--no-torch")
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  data = json.loads(out.read_text())
  recs = data if isinstance(data, list) else data["records"]
  assert {r["mode"] for r in recs} == {"train", "eval"}
  for r in recs:
    assert r["jaxft_images_per_s"] > 0
    assert ("ratio" in r) == with_torch
  if with_torch:
    assert "jaxft/torch images/s ratios" in proc.stdout


@pytest.mark.parametrize("h,cin,cout,k,s", [(6, 3, 8, 7, 2), (5, 8, 4, 3, 2), (18, 4, 6, 3, 1),
                                            (18, 8, 16, 1, 2)])
def test_conv_passes_versus_torch_times_the_same_gradients(h, cin, cout, k, s):
  pytest.importorskip("torch")
  import jax  # pylint: disable=g-import-not-at-top
  p = k // 2
  ho = (h + 2 * p - k) // s + 1
  kx, kw, kd = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (2, h, h, cin))
  w = jax.random.normal(kw, (k, k, cin, cout))
  dy = jax.random.normal(kd, (2, ho, ho, cout))
  calls = []

  def timed(f, *a):
    calls.append(f)
    jax.block_until_ready(f(*a))
    return 0.5

  t_jax, t_torch, err = bench_conv_passes._versus_torch(  # pylint: disable=protected-access
      x, w, dy, (s, s), ((p, p), (p, p)), timed)
  assert (t_jax, t_torch, len(calls)) == (0.5, 0.5, 2)
  assert err < 1e-5
