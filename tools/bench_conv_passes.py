"""Per-pass speed of each convolution formulation on this machine (the data behind ``conv.py``'s plan).

    python tools/bench_conv_passes.py                 # ResNet-50 convs at 224 px, batch 32: GFLOP/s
    python tools/bench_conv_passes.py --size 32 --batch 128
    python tools/bench_conv_passes.py --floor         # the same convs as bare GEMMs: the step's floor

For every distinct convolution of torchvision's ResNet-50 at the given image size it times, in
GFLOP/s: ``lax.conv`` forward, the patch-GEMM forward, XLA's kernel gradient and input gradient, and
the GEMM gradients (``jaxft.models.conv._gemm_conv_bwd``). ``--floor`` instead times the three GEMMs
of every convolution (forward, kernel gradient, input gradient; live taps only) as plain 2-D dots and
prints their sum over the network, i.e. the least time any GEMM formulation of one training step can
take with this machine's dot. XLA flags are :data:`jaxft.models.conv.CPU_XLA_FLAGS` unless
``XLA_FLAGS`` is set.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def resnet50_convs(size: int) -> list[tuple[int, int, int, int, int, int]]:
  """(input map, cin, cout, kernel, stride, count) of torchvision's ResNet-50 at ``size`` px."""
  convs = [(size, 3, 64, 7, 2, 1)]
  h = (size + 1) // 2
  h = (h + 1) // 2  # max-pool
  cin = 64
  for mid, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
    out = mid * 4
    ho = (h - 1) // stride + 1
    convs += [(h, cin, mid, 1, 1, 1), (h, mid, mid, 3, stride, 1), (ho, mid, out, 1, 1, 1),
              (h, cin, out, 1, stride, 1)]
    convs += [(ho, out, mid, 1, 1, blocks - 1), (ho, mid, mid, 3, 1, blocks - 1),
              (ho, mid, out, 1, 1, blocks - 1)]
    h, cin = ho, out
  merged: dict[tuple[int, ...], int] = {}
  for *key, n in convs:
    merged[tuple(key)] = merged.get(tuple(key), 0) + n
  return [(*k, n) for k, n in merged.items()]


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--size", type=int, default=224)
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--floor", action="store_true", help="time the bare GEMMs of one training step")
  args = ap.parse_args()

  from jaxft.models import conv  # pylint: disable=g-import-not-at-top
  conv.configure_cpu()
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax import lax  # pylint: disable=g-import-not-at-top

  def timed(f, *a) -> float:
    jax.block_until_ready(f(*a))
    ts = []
    for _ in range(args.repeats):
      t = time.perf_counter()
      jax.block_until_ready(f(*a))
      ts.append(time.perf_counter() - t)
    return float(np.median(ts))

  key = jax.random.key(0)
  total = {"fwd": 0.0, "dW": 0.0, "dX": 0.0}
  print(f"# {jax.devices()[0].device_kind}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, "
        f"ResNet-50 at {args.size} px, batch {args.batch}")
  for h, cin, cout, k, s, n in resnet50_convs(args.size):
    p = k // 2
    pad, strides = ((p, p), (p, p)), (s, s)
    ho = (h + 2 * p - k) // s + 1
    name = f"{k}x{k} {cin:>4}->{cout:<4} s{s} on {h}x{h} (x{n})"
    if args.floor:
      rows = conv._live_taps(h, k, s, (p, p))  # pylint: disable=protected-access
      m, kk = args.batch * ho * ho, (rows[1] - rows[0]) ** 2 * cin
      a = jax.random.normal(key, (m, kk))
      w = jax.random.normal(key, (kk, cout))
      d = jax.random.normal(key, (m, cout))
      t = {"fwd": timed(jax.jit(lambda a, w: a @ w), a, w),
           "dW": timed(jax.jit(lambda a, d: lax.dot_general(a, d, (((0,), (0,)), ((), ())))), a, d),
           "dX": 0.0 if cin == 3 else timed(
               jax.jit(lambda d, w: lax.dot_general(d, w, (((1,), (1,)), ((), ())))), d, w)}
      for pas, v in t.items():
        total[pas] += v * n
      print(f"{name:<34} M{m} K{kk} N{cout}: " + "  ".join(f"{pas} {v * 1e3:6.2f} ms"
                                                           for pas, v in t.items()), flush=True)
      continue
    x = jax.random.normal(key, (args.batch, h, h, cin))
    w = jax.random.normal(key, (k, k, cin, cout)) * 0.05
    dy = jax.random.normal(key, (args.batch, ho, ho, cout))
    gf = 2 * args.batch * ho * ho * cin * cout * k * k / 1e9
    f = lambda x, w: conv._lax_conv(x, w, strides, pad)  # pylint: disable=protected-access
    t = [timed(jax.jit(f), x, w),
         timed(jax.jit(lambda x, w: conv.gemm_conv(x, w, strides, pad, False)), x, w),
         timed(jax.jit(lambda x, w, dy: jax.vjp(lambda w: f(x, w), w)[1](dy)), x, w, dy),
         timed(jax.jit(lambda x, w, dy: jax.vjp(lambda x: f(x, w), x)[1](dy)), x, w, dy),
         timed(jax.jit(lambda x, w, dy: conv._gemm_conv_bwd(  # pylint: disable=protected-access
             strides, pad, False, (x, w), dy)), x, w, dy)]
    rate = [gf / t[0], gf / t[1], gf / t[2], gf / t[3], 2 * gf / t[4]]
    print(f"{name:<34} GFLOP/s: lax fwd {rate[0]:4.0f}  gemm fwd {rate[1]:4.0f}  lax dW {rate[2]:4.0f}"
          f"  lax dX {rate[3]:4.0f}  gemm dW+dX {rate[4]:4.0f}", flush=True)
  if args.floor:
    print("per training step (ms): " + "  ".join(f"{k} {v * 1e3:.1f}" for k, v in total.items())
          + f"  sum {sum(total.values()) * 1e3:.1f}")


if __name__ == "__main__":
  main()
