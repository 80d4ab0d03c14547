"""Weight conversion: parity with real torchvision / real CIFAR ResNet weights, strictness, file formats."""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from jaxft import convert, paths
from jaxft.convert import download, tables
from jaxft.models import IMAGENET_MEAN, IMAGENET_STD, get_spec

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional
ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------------
# Helpers.


def fake_state_dict(arch: str, num_classes: int | None = None, seed: int = 0) -> dict[str, np.ndarray]:
  """A random torch-layout state dict for ``arch``, built from the shapes of the jaxft network (no torch)."""
  spec = get_spec(arch, num_classes)
  shapes = tables.target_shapes(spec)
  rs = np.random.RandomState(seed)
  return {e.torch: rs.randn(*tables.torch_shape(e.rule, shapes[e.path])).astype(np.float32)
          for e in convert.mapping_table(spec)}


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
  """Gives every BatchNorm random running statistics and affine parameters (in place; returns it)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, nn.BatchNorm2d):
        c = m.num_features
        m.running_mean.copy_(0.2 * torch.randn(c, generator=g))
        m.running_var.copy_(0.5 + torch.rand(c, generator=g))
        m.weight.copy_(0.5 + torch.rand(c, generator=g))
        m.bias.copy_(0.2 * torch.randn(c, generator=g))
  return model


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
  return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def torchvision_model(arch: str) -> nn.Module:
  torchvision = pytest.importorskip("torchvision")
  torch.manual_seed(0)
  return randomize_bn(getattr(torchvision.models, arch)(weights=None))


# ---------------------------------------------------------------------------------------------------------
# Parity with real torchvision.

PARITY = [
    ("resnet18", 32), ("resnet18", 224), ("resnet50", 32), ("resnet50", 224),
    ("resnext50_32x4d", 32),
    pytest.param("wide_resnet50_2", 32, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("arch,size", PARITY)
def test_torchvision_eval_parity(arch: str, size: int) -> None:
  tm = torchvision_model(arch).eval()
  model = convert.convert_state_dict(tm.state_dict(), arch)
  x = np.random.RandomState(1).randn(2, 3, size, size).astype(np.float32)
  with torch.no_grad():
    want = tm(torch.from_numpy(x)).numpy()
  got = np.asarray(jax.jit(model.module().apply)(model.variables, x.transpose(0, 2, 3, 1)))
  assert got.shape == want.shape == (2, 1000)
  assert rel_err(got, want) <= 1e-5
  np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.parametrize("arch,size,batch", [
    ("resnet18", 32, 4), pytest.param("resnet50", 224, 2, marks=pytest.mark.slow)])
def test_torchvision_train_mode_bn_statistics(arch: str, size: int, batch: int) -> None:
  tm = torchvision_model(arch)
  ref64 = copy.deepcopy(tm).double()
  model = convert.convert_state_dict(tm.state_dict(), arch)
  x = np.random.RandomState(2).randn(batch, 3, size, size).astype(np.float32)
  tm.train()
  ref64.train()
  with torch.no_grad():
    tm(torch.from_numpy(x))
    ref64(torch.from_numpy(x).double())
  _, upd = jax.jit(lambda v, x: model.module().apply(v, x, train=True, mutable=["batch_stats"]))(
      model.variables, x.transpose(0, 2, 3, 1))
  # Compare through the mapping table so that every BN layer of the torch model is checked.
  after = convert.unwrap_state_dict(tm.state_dict())
  exact = {k: v.numpy() for k, v in ref64.state_dict().items()}
  flat = paths.flatten({"batch_stats": upd["batch_stats"]})
  checked = 0
  for e in convert.mapping_table(model.spec):
    if not e.path.startswith("batch_stats/"):
      continue
    checked += 1
    if arch == "resnet18":
      assert rel_err(flat[e.path], after[e.torch]) <= 1e-5, e.torch
    else:
      # Train-mode BN through 50 random layers amplifies float32 rounding: torch's own float32 result is
      # ~1.3e-5 away from float64 in the last stage. So hold jaxft to 1e-5 of the float64 truth, or to
      # twice torch's own float32 error where that is larger.
      torch_err = rel_err(after[e.torch], exact[e.torch])
      assert rel_err(flat[e.path], exact[e.torch]) <= max(1e-5, 2 * torch_err), e.torch
  assert checked == sum(2 for m in tm.modules() if isinstance(m, nn.BatchNorm2d))


# ---------------------------------------------------------------------------------------------------------
# Real pretrained CIFAR ResNet-56 (He et al. 2016, option-A shortcuts), reference written from its facts.


class CifarBlock(nn.Module):

  def __init__(self, cin: int, cout: int, stride: int) -> None:
    super().__init__()
    self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(cout)
    self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(cout)
    self.pad = (cout - cin) // 2 if (stride != 1 or cin != cout) else None

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    h = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
    sc = x if self.pad is None else F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))
    return F.relu(h + sc)


class CifarResNet(nn.Module):

  def __init__(self, n: int, num_classes: int = 10) -> None:
    super().__init__()
    self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(16)
    cin, stages = 16, []
    for i, w in enumerate((16, 32, 64)):
      blocks = []
      for j in range(n):
        blocks.append(CifarBlock(cin, w, 2 if (i > 0 and j == 0) else 1))
        cin = w
      stages.append(nn.Sequential(*blocks))
    self.layer1, self.layer2, self.layer3 = stages
    self.linear = nn.Linear(64, num_classes)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = F.relu(self.bn1(self.conv1(x)))
    x = self.layer3(self.layer2(self.layer1(x)))
    return self.linear(x.mean((2, 3)))


def load_folder(root: Path) -> tuple[np.ndarray, np.ndarray]:
  classes = sorted(p.name for p in root.iterdir() if p.is_dir())
  images, labels = [], []
  for i, c in enumerate(classes):
    for f in sorted((root / c).iterdir()):
      images.append(np.asarray(Image.open(f).convert("RGB")))
      labels.append(i)
  return np.stack(images), np.asarray(labels)


@pytest.mark.slow
def test_real_cifar_resnet56_matches_torch(resnet56_th: Path, cifar_folder: Path) -> None:
  model = convert.convert_file(resnet56_th, "cifar_resnet56")
  assert model.meta["source"]["file"] == resnet56_th.name
  assert model.meta["num_classes"] == 10 and model.meta["input_size"] == 32

  tm = CifarResNet(9).eval()
  tm.load_state_dict({k: torch.from_numpy(v) for k, v in convert.load_state_dict(resnet56_th).items()},
                     strict=True)
  images, labels = load_folder(cifar_folder)
  assert images.shape == (1000, 32, 32, 3)
  x = (images / 255.0 - np.asarray(IMAGENET_MEAN)) / np.asarray(IMAGENET_STD)
  x = x.astype(np.float32)
  with torch.no_grad():
    want = tm(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
  got = np.asarray(jax.jit(model.module().apply)(model.variables, x))
  agree = float(np.mean(got.argmax(-1) == want.argmax(-1)))
  acc_torch = float(np.mean(want.argmax(-1) == labels))
  acc_jax = float(np.mean(got.argmax(-1) == labels))
  print(f"\nresnet56 on {len(labels)} CIFAR-10 train JPEGs: torch top-1 {acc_torch:.4f}, "
        f"jaxft top-1 {acc_jax:.4f}, agreement {agree:.4f}, rel. logit err {rel_err(got, want):.2e}")
  assert agree >= 0.999
  assert rel_err(got, want) <= 1e-4
  assert acc_jax > 0.8  # a pretrained model, not noise


# ---------------------------------------------------------------------------------------------------------
# File formats and wrappers.


def test_wrapped_and_prefixed_state_dict_converts_the_same() -> None:
  sd = fake_state_dict("cifar_resnet20")
  plain = convert.convert_state_dict(sd, "cifar_resnet20")
  wrapped = {"epoch": 3, "model": {"state_dict": {f"module.{k}": torch.from_numpy(v) for k, v in sd.items()}}}
  wrapped["model"]["state_dict"]["module.bn1.num_batches_tracked"] = torch.tensor(7)
  other = convert.convert_state_dict(wrapped, "cifar_resnet20")
  jax.tree.map(np.testing.assert_array_equal, plain.variables, other.variables)
  k = np.asarray(plain.params["stem"]["conv"]["kernel"])
  np.testing.assert_array_equal(k, sd["conv1.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(plain.params["head"]["kernel"], sd["linear.weight"].T)
  np.testing.assert_array_equal(plain.batch_stats["layer2"]["block1"]["bn2"]["var"],
                                sd["layer2.1.bn2.running_var"])


def test_pickle_needing_more_than_tensors_needs_trust_pickle(tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
  sd = {k: torch.from_numpy(v) for k, v in fake_state_dict("cifar_resnet20").items()}
  p = tmp_path / "old.th"
  torch.save({"state_dict": sd, "args": argparse.Namespace(lr=0.1)}, p)  # refused by weights_only=True
  with pytest.raises(convert.ConversionError) as e:
    convert.convert_file(p, "cifar_resnet20")
  assert str(e.value) == (
      "old.th: the pickle needs argparse.Namespace, which the torch-free reader does not load: unpickling it "
      "could run code from the file; torch.load(weights_only=True) refuses it too (UnpicklingError). If "
      "you made this file yourself, pass trust_pickle=True (tools/convert_torch_weights.py --trust-pickle), "
      "which runs code from the file; otherwise re-save only its tensors (torch.save(model.state_dict(), …) "
      "or .safetensors) where running it is safe.")
  with caplog.at_level(logging.WARNING, logger="jaxft.convert"):
    model = convert.convert_file(p, "cifar_resnet20", trust_pickle=True)
  assert "loading it with torch.load(weights_only=False) as trust_pickle=True asks" in caplog.text
  assert model.meta["source"]["sha256"] == convert.sha256(p)


def test_torch_is_only_called_with_weights_only_true(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
  # A file the restricted reader refuses but torch's own safe loader accepts (a Counter) is read by
  # torch with weights_only=True; nothing ever retries with weights_only=False unasked.
  import collections
  p = tmp_path / "w.pth"
  sd = {k: torch.from_numpy(v) for k, v in fake_state_dict("cifar_resnet20").items()}
  torch.save({"state_dict": sd, "counts": collections.Counter(a=1)}, p)
  calls, load = [], torch.load
  monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k["weights_only"]) or load(*a, **k))
  convert.convert_file(p, "cifar_resnet20")
  assert calls == [True]
  q = tmp_path / "ns.pth"
  torch.save({"state_dict": sd, "args": argparse.Namespace(lr=0.1)}, q)
  with pytest.raises(convert.ConversionError, match="needs argparse.Namespace"):
    convert.convert_file(q, "cifar_resnet20")
  assert calls == [True, True]


def test_real_checkpoints_read_without_torch(resnet56_th: Path) -> None:
  # The shared ResNet-56 is a legacy-format pickle (torch._utils._rebuild_tensor, a float accuracy):
  # plain tensors, so the restricted reader needs neither torch nor trust.
  code = ("import sys; sys.modules['torch'] = None\n"
          "from jaxft import convert\n"
          f"sd = convert.load_state_dict({str(resnet56_th)!r})\n"
          "print(len(sd), sd['conv1.weight'].shape, sd['conv1.weight'].dtype)\n")
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert r.returncode == 0, r.stderr
  assert r.stdout.split("\n")[0] == "277 (16, 3, 3, 3) float32"


def test_safetensors_without_torch(tmp_path: Path) -> None:
  from safetensors.numpy import save_file
  sd = fake_state_dict("cifar_resnet20")
  src = tmp_path / "w.safetensors"
  save_file(sd, str(src))
  out = tmp_path / "params.npz"
  code = ("import sys; sys.modules['torch'] = None\n"
          "import numpy as np\n"
          "from jaxft import convert, paths\n"
          f"m = convert.convert_file({str(src)!r}, 'cifar_resnet20')\n"
          "assert sys.modules['torch'] is None\n"
          f"np.savez({str(out)!r}, **paths.flatten(m.variables))\n"
          "print(m.meta['source']['sha256'])\n")
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr
  assert r.stdout.split()[-1] == convert.sha256(src)
  got = dict(np.load(out))
  want = paths.flatten(convert.convert_state_dict(sd, "cifar_resnet20").variables)
  assert sorted(got) == sorted(want)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k])


def test_torch_pickle_without_torch_says_so(tmp_path: Path) -> None:
  # Plain tensor pickles are read without torch (tests/test_efficientnet.py); one that needs another
  # global (here argparse.Namespace) is refused, and trusting it still needs torch.
  p = tmp_path / "w.pth"
  torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in fake_state_dict("cifar_resnet20").items()},
              "args": argparse.Namespace(lr=0.1)}, p)
  refused = "w.pth: the pickle needs argparse.Namespace, which the torch-free reader does not load"
  for trust, want in ((False, refused), (True, "reading w.pth needs PyTorch (pip install torch)")):
    code = ("import sys; sys.modules['torch'] = None\n"
            "from jaxft import convert\n"
            f"convert.convert_file({str(p)!r}, 'cifar_resnet20', trust_pickle={trust})\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode != 0
    assert want in r.stderr


# ---------------------------------------------------------------------------------------------------------
# Heads.


def test_new_num_classes_replaces_only_the_head() -> None:
  sd = fake_state_dict("cifar_resnet20")
  base = convert.convert_state_dict(sd, "cifar_resnet20")
  a = convert.convert_state_dict(sd, "cifar_resnet20", num_classes=3, rng=jax.random.key(1))
  b = convert.convert_state_dict(sd, "cifar_resnet20", num_classes=3, rng=jax.random.key(2))
  assert a.meta["source"]["new_head"] and not base.meta["source"]["new_head"]
  assert a.meta["source"]["num_classes"] == 10 and a.meta["num_classes"] == 3
  assert a.spec.num_classes == 3
  assert a.params["head"]["kernel"].shape == (64, 3) and a.params["head"]["bias"].shape == (3,)
  assert not np.array_equal(a.params["head"]["kernel"], b.params["head"]["kernel"])
  fa, fb = paths.flatten(a.variables), paths.flatten(base.variables)
  assert set(fa) == set(fb)
  for k in fa:
    if not k.startswith("params/head/"):
      np.testing.assert_array_equal(fa[k], fb[k])
  assert a.apply(np.zeros((2, 32, 32, 3), np.float32)).shape == (2, 3)


def test_none_num_classes_keeps_the_files_head() -> None:
  model = convert.convert_state_dict(fake_state_dict("cifar_resnet20", num_classes=7), "cifar_resnet20")
  assert model.spec.num_classes == 7 and not model.meta["source"]["new_head"]


# ---------------------------------------------------------------------------------------------------------
# Bad inputs: one error listing everything, with a hint.


def test_wrong_arch_hints_at_the_right_one() -> None:
  with pytest.raises(convert.ConversionError) as e:
    convert.convert_state_dict(fake_state_dict("resnet18"), "resnet50")
  msg = str(e.value)
  assert "cannot convert these weights to 'resnet50' with 1000 classes:" in msg
  assert "missing keys (165):" in msg and "mis-shaped keys" in msg
  assert "hint: wrong --arch? this file looks like resnet18" in msg


def test_wrong_family_hint() -> None:
  with pytest.raises(convert.ConversionError, match="this file looks like cifar_resnet20"):
    convert.convert_state_dict(fake_state_dict("cifar_resnet20"), "resnet18")


def test_missing_extra_and_misshaped_keys_reported_together() -> None:
  sd = fake_state_dict("cifar_resnet20")
  del sd["layer1.0.conv1.weight"]
  sd["extra.weight"] = np.zeros(3, np.float32)
  sd["layer3.2.bn2.bias"] = np.zeros(5, np.float32)
  with pytest.raises(convert.ConversionError) as e:
    convert.convert_state_dict(sd, "cifar_resnet20")
  msg = str(e.value)
  assert ("missing keys (1):\n    layer1.0.conv1.weight (→ params/layer1/block0/conv1/kernel, "
          "(3, 3, 16, 16))") in msg
  assert "unexpected keys (1):\n    extra.weight (3)" in msg
  assert ("mis-shaped keys (1):\n    layer3.2.bn2.bias: file (5), expected (64) "
          "(→ params/layer3/block2/bn2/bias)") in msg
  assert "hint:" in msg


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_truncated_file(tmp_path: Path, suffix: str) -> None:
  sd = fake_state_dict("cifar_resnet20")
  p = tmp_path / f"w{suffix}"
  if suffix == ".pth":
    torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, p)
  else:
    from safetensors.numpy import save_file
    save_file(sd, str(p))
  p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
  kind = "PyTorch weights file" if suffix == ".pth" else ".safetensors file"
  with pytest.raises(convert.ConversionError, match=f"is not a readable {kind}"):
    convert.convert_file(p, "cifar_resnet20")


def test_not_a_weights_file(tmp_path: Path) -> None:
  p = tmp_path / "notes.pth"
  p.write_text("these are not weights\n")
  with pytest.raises(convert.ConversionError, match="is not a readable PyTorch weights file"):
    convert.convert_file(p, "cifar_resnet20")
  q = tmp_path / "list.pth"
  torch.save([1, 2, 3], q)
  with pytest.raises(convert.ConversionError, match="expected a state dict .* got list"):
    convert.convert_file(q, "cifar_resnet20")


def test_nonexistent_path_and_unknown_arch(tmp_path: Path) -> None:
  with pytest.raises(FileNotFoundError, match="weights file not found: .*nope.pth"):
    convert.convert_file(tmp_path / "nope.pth", "resnet18")
  with pytest.raises(ValueError, match="unknown architecture 'resnet19'. Did you mean"):
    convert.convert_state_dict(fake_state_dict("resnet18"), "resnet19")


def test_offline_download_fails_at_once_with_instructions(monkeypatch: pytest.MonkeyPatch,
                                                           tmp_path: Path) -> None:
  import torch.hub

  def offline(address, timeout):  # noqa: ANN001
    raise OSError("[Errno 101] Network is unreachable")

  def never(*a, **k):  # noqa: ANN002, ANN003
    raise AssertionError("must not try to download when offline")

  monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
  monkeypatch.setattr(torch.hub, "download_url_to_file", never)
  monkeypatch.setattr(download, "_connect", offline)
  with pytest.raises(convert.ConversionError) as e:
    convert.convert_source("torchvision:resnet50")
  msg = str(e.value)
  assert "cannot download https://download.pytorch.org/models/resnet50-0676ba61.pth: no network" in msg
  assert "python tools/convert_torch_weights.py resnet50-0676ba61.pth OUT_DIR --arch resnet50" in msg
  assert "Network is unreachable" in msg


def test_cli_end_to_end(tmp_path: Path) -> None:
  from safetensors.numpy import save_file
  sd = fake_state_dict("cifar_resnet20")
  src = tmp_path / "w.safetensors"
  save_file(sd, str(src))
  out = tmp_path / "ckpt"
  cmd = [sys.executable, str(ROOT / "tools" / "convert_torch_weights.py"), str(src), str(out),
         "--arch", "cifar_resnet20", "--num-classes", "4"]
  env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's jaxft, also where another is installed
  r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
  assert r.returncode == 0, r.stderr
  assert "arch cifar_resnet20" in r.stdout
  assert "new 4-class head (source had 10 classes)" in r.stdout
  assert convert.sha256(src) in r.stdout
  from jaxft.checkpoint import load_model
  m = load_model(out)
  assert m.spec.num_classes == 4 and m.meta["source"]["file"] == "w.safetensors"
  np.testing.assert_array_equal(m.params["stem"]["conv"]["kernel"], sd["conv1.weight"].transpose(2, 3, 1, 0))
  # A second run without --force refuses to overwrite.
  r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
  assert r.returncode != 0 and "already exists; pass --force to overwrite" in r.stderr
