"""What each of jaxft's bfloat16-on-CPU changes gains, in one process: interleaved A/B.

    python tools/bench_bf16.py --change all      # oneDNN bfloat16 (convs, BN, 1x1 matmul) vs XLA's
    python tools/bench_bf16.py --change bn       # jaxft's compiled BatchNorm (+ ReLU) vs XLA's GEMV one
    python tools/bench_bf16.py --change gemm     # 1x1 kernel gradients as a matmul vs oneDNN's conv
    python tools/bench_bf16.py --change epilogue --mode eval   # BN/residual/ReLU as conv post-ops
    python tools/bench_bf16.py --change matmul --size 32 --batch 128   # small-map GEMMs by oneDNN
    python tools/bench_bf16.py --change relu     # ReLU's derivative from its output (residual adds)
    python tools/bench_bf16.py --change pool     # the stem's max-pool by oneDNN vs jaxft.cpu.pool's
    JAXFT_ONEDNN_AUTO=1 python tools/bench_bf16.py --change onednn --dtype float32   # oneDNN vs XLA plans

Builds ``tools/bench.py``'s jaxft train (or eval) step (ResNet-50, bfloat16 unless ``--dtype``) twice in one process — as shipped
(A) and with the change switched off while the second one is traced (B) — then times them in
alternating pairs of steps and prints both medians and A's gain over B last. Needs a CPU with
AMX-BF16 or AVX512-BF16 and jaxft's oneDNN wrapper (``python -m jaxft.cpu build``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _switch_off(change: str) -> None:
  from jaxft.cpu import onednn  # pylint: disable=g-import-not-at-top
  if change == "all":
    onednn.bf16_supported = lambda: False
  elif change == "bn":
    onednn.norm_supported = lambda *args: False
  elif change == "epilogue":
    from jaxft.cpu import epilogue  # pylint: disable=g-import-not-at-top
    epilogue.fusable = lambda e: False  # the epilogue then runs in XLA after oneDNN's convolution
  elif change == "matmul":
    onednn.matmul_supported = lambda dtype: False  # the small-map GEMMs then are XLA's dots
  elif change == "onednn":
    onednn.loaded = lambda: False  # every convolution then runs the XLA / GEMM plans (impl.py)
  elif change == "pool":
    onednn.pool_supported = lambda *args: False  # the stem's max-pool then is XLA's (jaxft.cpu.pool)
  elif change == "relu":
    import flax.linen as nn  # pylint: disable=g-import-not-at-top
    from jaxft.models import layers  # pylint: disable=g-import-not-at-top
    layers.ACTIVATIONS["relu"] = nn.relu  # its derivative reads the input: add and ReLU in two passes
  elif change == "gemm":
    onednn._pointwise_kernel_grad = (  # pylint: disable=protected-access
        lambda x, dy, ks, st, dt: onednn.kernel_grad(x, dy, ks, st, ((0, 0), (0, 0)), 1, dt))


def main(argv: list[str]) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--change", choices=("all", "bn", "gemm", "epilogue", "matmul", "onednn", "relu", "pool"), required=True)
  p.add_argument("--mode", choices=("train", "eval"), default="train")
  p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
  p.add_argument("--model", default="resnet50")
  p.add_argument("--size", type=int, default=224)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--rounds", type=int, default=4, help="alternating pairs of timed steps")
  args = p.parse_args(argv)
  import jaxft.cpu  # pylint: disable=g-import-not-at-top
  jaxft.cpu.enable()
  import bench  # pylint: disable=g-import-not-at-top  # tools/bench.py
  from jaxft.cpu import onednn  # pylint: disable=g-import-not-at-top
  if not (onednn.loaded() and (onednn.bf16_supported() or args.dtype == "float32")):
    print(f"needs oneDNN and bfloat16 instructions: oneDNN {onednn.status()}, "
          f"bfloat16 instructions {onednn.bf16_supported()}", file=sys.stderr)
    return 2
  w = dict(model=args.model, num_classes=10, dtype=args.dtype, conv_impl="auto", batch=args.batch,
           eval_batch=args.batch, size=args.size)
  with_change = bench.JaxWorker(w)
  mode = args.mode
  with_change.compile(mode)
  _switch_off(args.change)
  without = bench.JaxWorker(w)
  without.compile(mode)
  with_change.run(mode, 2)
  without.run(mode, 2)
  ta: list[float] = []
  tb: list[float] = []
  for _ in range(args.rounds):
    ta += with_change.run(mode, 2)
    tb += without.run(mode, 2)
  a, b = statistics.median(ta), statistics.median(tb)
  print(f"{args.model} {args.size}px {args.dtype} {mode} b{args.batch}, change {args.change}: "
        f"with {args.batch / a:.2f} img/s, without {args.batch / b:.2f} img/s; "
        f"gain {b / a:.3f}x (min-step ratio {min(tb) / min(ta):.3f}x)")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
