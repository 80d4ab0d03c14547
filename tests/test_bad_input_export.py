"""Bad input to the exporter (``tools/export_torch.py`` and ``jaxft.export``): one line ``error: …``
naming the problem and the fix, a nonzero exit (2 bad input, 4 a damaged checkpoint), no traceback,
and nothing written."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from jaxft import checkpoint, export, surgery
from jaxft.models import create_model

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "export_torch.py"


def _tool():
  spec = importlib.util.spec_from_file_location("export_torch", TOOL)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
  model = create_model("cifar_resnet8", jax.random.key(0), num_classes=3)
  return checkpoint.save_model(tmp_path_factory.mktemp("ckpt") / "model", model)


def run_main(capsys: pytest.CaptureFixture, *args) -> tuple[int, str]:
  code = _tool().main([str(a) for a in args])
  err = capsys.readouterr().err.strip()
  return code, err


def test_bad_cli_input_gives_one_line_and_exit_2(ckpt: Path, tmp_path: Path, capsys) -> None:
  (tmp_path / "taken.pth").write_bytes(b"keep me")
  (tmp_path / "notackpt").mkdir()
  cases = [
      ((tmp_path / "nope", tmp_path / "a.pth"), "error: no such checkpoint: "),
      ((tmp_path / "notackpt", tmp_path / "a.pth"), "is not a jaxft checkpoint"),
      ((ckpt, tmp_path / "a.npz"), "error: cannot write 'a.npz': unknown file type '.npz'; name the output "
                                   "*.pth or *.pt or *.safetensors"),
      ((ckpt, tmp_path / "taken.pth"), "taken.pth exists; pass --force to overwrite it"),
      ((ckpt, tmp_path / "a.pth", "--ema"), "holds no EMA weights (a model directory has none); drop --ema"),
      ((ckpt, tmp_path / "no" / "dir" / "a.pth"), "cannot write " + str(tmp_path / "no" / "dir" / "a.pth")
       + ": no directory"),
  ]
  for args, message in cases:
    code, err = run_main(capsys, *args)
    assert code == 2, (args, err)
    assert err.startswith("error: ") and message in err and "\n" not in err, (args, err)
  assert (tmp_path / "taken.pth").read_bytes() == b"keep me"
  assert not list(tmp_path.glob("a.*")) and not (tmp_path / "no").exists()


def test_structure_without_torch_names(tmp_path: Path, capsys) -> None:
  model = create_model("cifar_resnet8", jax.random.key(0), num_classes=3)
  odd = surgery.replace_block(model, "layer1/block0", {"kind": "mbconv", "width": 32})
  path = checkpoint.save_model(tmp_path / "odd", odd)
  code, err = run_main(capsys, path, tmp_path / "odd.pth")
  assert code == 2
  assert err == ("error: cannot export: block layer1/block0 is of kind 'mbconv', which has no "
                 "torchvision ResNet name")
  assert not (tmp_path / "odd.pth").exists()


def test_damaged_checkpoint_exits_4(ckpt: Path, tmp_path: Path, capsys) -> None:
  import shutil
  broken = Path(shutil.copytree(ckpt, tmp_path / "broken"))
  victim = max((p for p in (broken / checkpoint.VARIABLES_ITEM).rglob("*") if p.is_file()),
               key=lambda p: p.stat().st_size)
  victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
  code, err = run_main(capsys, broken, tmp_path / "a.pth")
  assert code == 4 and err.startswith("error: checkpoint ") and "is damaged" in err
  assert not (tmp_path / "a.pth").exists()


def test_cli_process_prints_no_traceback(tmp_path: Path) -> None:
  r = subprocess.run([sys.executable, str(TOOL), str(tmp_path / "nope"), str(tmp_path / "a.pth")],
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 2
  assert r.stderr.strip().splitlines() == [f"error: no such checkpoint: {tmp_path / 'nope'}"]


def test_library_errors(tmp_path: Path) -> None:
  model = create_model("cifar_resnet8", jax.random.key(0), num_classes=3)
  with pytest.raises(export.ExportError, match=r"unknown file type '\.onnx'"):
    export.save_torch(model, tmp_path / "m.onnx")
  (tmp_path / "m.safetensors").write_bytes(b"x")
  with pytest.raises(export.ExportError, match="exists; pass force=True"):
    export.save_torch(model, tmp_path / "m.safetensors")
  export.save_torch(model, tmp_path / "m.safetensors", force=True)
  assert (tmp_path / "m.safetensors").stat().st_size > 1000
  assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temporary file left


def test_pth_without_torch_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
  monkeypatch.setitem(sys.modules, "torch", None)  # import torch now raises ImportError
  model = create_model("cifar_resnet8", jax.random.key(0), num_classes=3)
  with pytest.raises(export.ExportError, match=r"writing \.pth needs torch \(pip install 'jaxft\[torch\]'\); "
                                               r"or write \.safetensors"):
    export.save_torch(model, tmp_path / "m.pth")
  assert not list(tmp_path.iterdir())
  export.save_torch(model, tmp_path / "m.safetensors")  # needs no torch
