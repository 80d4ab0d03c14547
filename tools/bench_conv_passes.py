"""Per-pass speed of each CPU convolution formulation on this machine (the data behind ``jaxft.cpu``'s plan).

    python tools/bench_conv_passes.py                 # ResNet-50 convs at 224 px, batch 32: GFLOP/s
    python tools/bench_conv_passes.py --size 32 --batch 128
    python tools/bench_conv_passes.py --floor         # the same convs as bare GEMMs: the step's floor
    python tools/bench_conv_passes.py --torch         # jaxft's automatic plan vs torch, per conv

For every distinct convolution of torchvision's ResNet-50 at the given image size it times, in
GFLOP/s: ``lax.conv`` forward, the patch-GEMM forward, XLA's kernel gradient and input gradient, and
the GEMM gradients (``jaxft.cpu.conv._gemm_conv_bwd``). ``--floor`` instead times the three GEMMs
of every convolution (forward, kernel gradient, input gradient; live taps only) as plain 2-D dots and
prints their sum over the network, i.e. the least time any GEMM formulation of one training step can
take with this machine's dot. ``--torch`` times each convolution's forward pass plus both gradients
with jaxft's automatic choice (``impl="auto"``) and with a channels-last ``torch.nn.Conv2d`` in the same
process, and prints the torch/jaxft time ratio per convolution and for the whole network (> 1: jaxft
faster). The CPU backend is switched on first (``jaxft.cpu.enable()``): XLA flags are
:data:`jaxft.cpu.flags.CPU_XLA_FLAGS` unless ``XLA_FLAGS`` is set, and ``auto`` uses oneDNN where it
builds.
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
  ap.add_argument("--torch", action="store_true",
                  help="jaxft's automatic plan against torch's channels-last conv, fwd + both grads")
  args = ap.parse_args()

  import jaxft.cpu  # pylint: disable=g-import-not-at-top
  jaxft.cpu.enable()  # before JAX starts: flags, allocator, oneDNN
  import jax  # pylint: disable=g-import-not-at-top
  from jaxft.cpu import conv  # pylint: disable=g-import-not-at-top
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
    if args.torch:
      t_jax, t_torch, err = _versus_torch(x, w, dy, strides, pad, timed)
      total["jaxft"] = total.get("jaxft", 0.0) + t_jax * n
      total["torch"] = total.get("torch", 0.0) + t_torch * n
      print(f"{name:<34} ms (fwd + grads): jaxft {t_jax * 1e3:7.1f}  torch {t_torch * 1e3:7.1f}"
            f"  torch/jaxft {t_torch / t_jax:.2f}  (output and gradients differ by {err:.1e})", flush=True)
      continue
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
  if args.torch:
    print(f"all convolutions of one training step: jaxft {total['jaxft'] * 1e3:.0f} ms, torch "
          f"{total['torch'] * 1e3:.0f} ms, torch/jaxft {total['torch'] / total['jaxft']:.2f}")
  if args.floor:
    print("per training step (ms): " + "  ".join(f"{k} {v * 1e3:.1f}" for k, v in total.items())
          + f"  sum {sum(total.values()) * 1e3:.1f}")


def _versus_torch(x, w, dy, strides, pad, timed) -> tuple[float, float, float]:
  """Median seconds of forward + gradients (jaxft ``impl="auto"``, then torch channels-last) and the
  largest relative difference between their outputs and gradients (a check that both compute the
  same thing).
  The image's gradient is skipped when ``cin == 3``, as in a network. Inputs are not mutated."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from jaxft.cpu import conv  # pylint: disable=g-import-not-at-top

  h, cin = x.shape[1], x.shape[-1]
  k, cout = w.shape[0], w.shape[-1]
  f = lambda x, w: conv.convolve(x, w, strides, pad)  # impl="auto"
  first = 1 if cin == 3 else 0

  def fwd_bwd(x, w, dy):
    # The output is returned too: otherwise XLA drops the forward convolution, whose result the
    # gradients do not need, and the time would leave out the pass torch's timing includes.
    y, vjp = jax.vjp(f, x, w)
    return y, vjp(dy)[first:]

  step = jax.jit(fwd_bwd)
  t_jax = timed(step, x, w, dy)

  xt = torch.from_numpy(np.array(x)).permute(0, 3, 1, 2).requires_grad_(cin != 3)  # channels-last
  layer = torch.nn.Conv2d(cin, cout, k, strides[0], pad[0][0], bias=False)
  with torch.no_grad():
    layer.weight.copy_(torch.from_numpy(np.array(w)).permute(3, 2, 0, 1))
  layer = layer.to(memory_format=torch.channels_last)
  dyt = torch.from_numpy(np.array(dy)).permute(0, 3, 1, 2)

  def torch_step() -> None:
    layer.zero_grad(set_to_none=True)
    xt.grad = None
    layer(xt).backward(dyt)

  t_torch = timed(torch_step)
  y, grads = step(x, w, dy)
  ours = [np.asarray(y)] + [np.asarray(g) for g in grads]
  with torch.no_grad():
    y_torch = layer(xt).permute(0, 2, 3, 1).numpy()
  theirs = [y_torch] + ([] if cin == 3 else [xt.grad.permute(0, 2, 3, 1).numpy()]) + [
      layer.weight.grad.permute(2, 3, 1, 0).numpy()]
  err = max(float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30)) for a, b in zip(ours, theirs))
  return t_jax, t_torch, err


if __name__ == "__main__":
  main()
