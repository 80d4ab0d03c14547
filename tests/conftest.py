"""Shared fixtures: real assets from ``../shared`` (skipped where absent, as in a user's clone)."""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
from pathlib import Path

import pytest

# Wherever oneDNN is loaded the tests exercise it, also on AVX2-only CPUs where impl="auto" would
# otherwise keep XLA's plans (jaxft.cpu.onednn.preferred; its own test clears this).
os.environ.setdefault("JAXFT_ONEDNN_AUTO", "1")

SHARED = Path(os.environ.get("JAXFT_SHARED", Path(__file__).resolve().parents[2] / "shared"))
CIFAR_TAR = SHARED / "data" / "cifar10-jpeg-train.tar.gz"
RESNET_WEIGHTS = SHARED / "weights" / "cifar-resnet"


def extract_cifar_subset(dest: Path, per_class: int) -> Path:
  """Extracts the first ``per_class`` images (sorted by file name) of each class of the shared CIFAR-10
  JPEG tarball into ``dest/<class>/`` and returns ``dest``. Deterministic."""
  with tarfile.open(CIFAR_TAR, "r:gz") as tar:
    names = [m.name for m in tar.getmembers() if m.isfile() and m.name.endswith(".jpg")]
  by_class: dict[str, list[str]] = {}
  for name in names:
    by_class.setdefault(name.split("/")[-2], []).append(name)
  wanted = {n for ns in by_class.values() for n in sorted(ns)[:per_class]}
  # One sequential pass: random access into a .tar.gz re-decompresses from the start every time.
  with tarfile.open(CIFAR_TAR, "r|gz") as tar:
    for m in tar:
      if m.name in wanted:
        out = dest / m.name.split("/")[-2] / Path(m.name).name
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(tar.extractfile(m).read())
  return dest


def override(config, **dotted):
  """Sets ``config.a.b = v`` for each ``"a.b": v`` in ``dotted`` and returns ``config`` (tests only)."""
  for key, value in dotted.items():
    node = config
    *parents, last = key.split(".")
    for p in parents:
      node = node[p]
    node[last] = value
  return config


@pytest.fixture(scope="session")
def shared_dir() -> Path:
  """``../shared``; the test is skipped where it does not exist."""
  if not SHARED.is_dir():
    pytest.skip("../shared not present (real assets are only in the project's CI and dev machines)")
  return SHARED


@pytest.fixture(scope="session")
def cifar_folder(shared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
  """A class-folder dataset of 100 real CIFAR-10 training images per class (1,000 in all)."""
  return extract_cifar_subset(tmp_path_factory.mktemp("cifar10") / "train", per_class=100)


@pytest.fixture(scope="session")
def resnet56_th(shared_dir: Path) -> Path:
  """The real pretrained CIFAR ResNet-56 torch checkpoint."""
  paths = sorted(RESNET_WEIGHTS.glob("resnet56-*.th"))
  if not paths:
    pytest.skip("resnet56 checkpoint missing from ../shared")
  return paths[0]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
  """Runs the ``slow`` tests first, the rest in their usual order. Under pytest-xdist the long runs then
  start early and the short tests fill in around them, instead of one worker finishing a long test alone
  at the end."""
  del config
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)


_XLA_CACHE = pytest.StashKey[str]()  # the run's cache directory, in the process that made it


def pytest_configure(config: pytest.Config) -> None:
  """One persistent XLA compilation cache for the whole run: this process, its pytest-xdist workers
  (started after this hook, they inherit the environment) and every CLI the tests start. Many tests
  compile the same small programs in separate processes; each is compiled once per run. The cache is
  new for every run (a cold start, as on a clean machine) and removed at the end. A size limit turns on
  jax's file locks, so a worker never reads an entry another one is still writing."""
  if "JAX_COMPILATION_CACHE_DIR" in os.environ:  # the user's own cache, or a worker of this run
    return
  cache = tempfile.mkdtemp(prefix="jaxft-tests-xla-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = cache
  os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(8 << 30))
  config.stash[_XLA_CACHE] = cache


def pytest_unconfigure(config: pytest.Config) -> None:
  cache = config.stash.get(_XLA_CACHE, None)
  if cache:
    shutil.rmtree(cache, ignore_errors=True)
    del os.environ["JAX_COMPILATION_CACHE_DIR"]

