"""Net2WiderNet widening (Chen, Goodfellow & Shlens 2016): more channels, the same function.

A channel *group* of ``n`` channels is widened to ``m`` by a *source map* ``g`` of length ``m``: new
channel ``j`` is a copy of old channel ``g[j]`` (``g[j] = j`` for ``j < n``, every old channel appears).
The modules that *produce* the group — the output channels of its convs (a depthwise conv's filters),
the BatchNorm's scale, bias and running statistics, a conv bias — are replicated by ``g``; the modules
that *consume* it — the input channels of a conv or a dense layer — are replicated by ``g`` and divided
by the number of copies of their source. A copy has the very same pre-activation as its source, so:

* eval mode: the consumers sum the copies back to the old values — the same logits;
* train mode: a copy has its source's batch mean and variance too, so the normalised values and the
  logits are the same, and the running statistics are updated to the old updates, replicated.

Optional symmetry-breaking ``noise`` perturbs the consumers' weights of the copies of each channel by
Gaussian noise that sums to zero over those copies: the function is unchanged (up to float rounding), but
the copies receive different gradients and can diverge in training.

:func:`widen` widens blocks' inner channels (``BLOCK_KINDS[kind].inner``); :func:`widen_stage` widens
residual *streams*: the outputs of blocks joined by identity shortcuts (a whole stage; the stem too when
the first block of the stage keeps its input's shape), with what writes them (each block's last conv and
BN, the downsample shortcut) and what reads them (the blocks' first convs, the next stage's first
block and shortcut, the neck or the heads). Option-A shortcuts (parameter-free zero padding) place their
input channels at fixed output positions: the stream after one is widened with those positions kept, and
must grow by at least as much as the stream before it (one call can widen both).

The source maps are drawn from ``seed`` and recorded under ``sources`` (as ``prune_channels`` records
the channels it keeps), so :func:`~jaxft.surgery.history.replay` is exact on any weights; the noise is
drawn from ``seed`` too. Hand-written: no library implements Net2Net for flax variable trees.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from jaxft import paths
from jaxft.models.model import Model
from jaxft.models.network import head_module_name
from jaxft.models.spec import ModelSpec
from jaxft.surgery.kinds import block_kind
from jaxft.surgery.rebuild import op_record, rebuild
from jaxft.surgery.select import block_inputs, check_expect, select_blocks, with_blocks

# The ops (each records itself under its own name; jaxft.surgery.history registers them).
__all__ = ["widen", "widen_stage"]


@dataclasses.dataclass(frozen=True)
class Group:
  """One channel group, as the modules that hold its channels.

  Attributes:
    name: its key in the record's ``sources`` (``layer1/block0/conv1``, ``stem+layer1``).
    width: its current number of channels.
    producers: modules whose every leaf (params and statistics) has one entry per channel on its last
      axis; replicated.
    consumers: modules whose ``kernel`` reads the group on its input axis (``-2``: HWIO convs and
      ``(in, out)`` dense layers); replicated and divided.
  """

  name: str
  width: int
  producers: tuple[str, ...]
  consumers: tuple[str, ...]


# --------------------------------------------------------------------------------------------------
# Source maps and the replication itself.


def _copies(n: int, extra: int, rng: np.random.Generator) -> np.ndarray:
  """``extra`` indices in ``[0, n)``, taken from whole random permutations so copies spread evenly."""
  if extra <= 0:
    return np.zeros(0, np.int64)
  perms = [rng.permutation(n) for _ in range(-(-extra // n))]
  return np.concatenate(perms)[:extra].astype(np.int64)


def draw_sources(n: int, m: int, rng: np.random.Generator) -> np.ndarray:
  """Returns a source map from ``n`` to ``m >= n`` channels: ``0 … n-1``, then ``m - n`` copies."""
  return np.concatenate([np.arange(n, dtype=np.int64), _copies(n, m - n, rng)])


def check_sources(name: str, given: Any, n: int, m: int) -> np.ndarray:
  """Returns ``given`` (a recorded or user source map) as an int array; raises ``ValueError`` unless it
  has ``m`` entries in ``[0, n)`` that cover every old channel."""
  g = np.asarray(given)
  ok = (g.shape == (m,) and (m == 0 or np.issubdtype(g.dtype, np.integer))
        and (m == 0 or (g.min() >= 0 and g.max() < n)) and len(np.unique(g)) == n)
  if not ok:
    raise ValueError(f"sources[{name!r}] must list {m} channel indices in [0, {n}) naming every old "
                     f"channel at least once (got {np.shape(given)} entries); pass the sources a widen "
                     "record holds, or none to draw them from seed")
  return g.astype(np.int64)


def _zero_sum_noise(kernel: np.ndarray, sources: np.ndarray, counts: np.ndarray, scale: float,
                    rng: np.random.Generator) -> np.ndarray:
  """Gaussian noise of ``kernel``'s shape (std ``scale``) whose sum over the copies of each source
  channel (input axis ``-2``) is zero: a channel with one copy gets none."""
  eps = np.moveaxis(rng.normal(0.0, scale, kernel.shape), -2, 0)
  sums = np.zeros((counts.size,) + eps.shape[1:])
  np.add.at(sums, sources, eps)
  mean = sums / counts.reshape((-1,) + (1,) * (eps.ndim - 1))
  return np.moveaxis(eps - mean[sources], 0, -2)


def replicate(variables: Mapping[str, Any], groups: Sequence[Group], sources: Mapping[str, np.ndarray],
              noise: float, seed: int) -> dict[str, Any]:
  """Returns the widened leaves (``{"<collection>/<path>": array}``) of every group in ``groups``.

  A leaf in several groups (a conv reading one group and writing another) is taken along each axis in
  turn. Group ``k``'s ``c``-th consumer draws its noise from ``default_rng([seed, 1, k, c])``.
  ``variables`` is never mutated.
  """
  old = paths.flatten(variables)
  by_module: dict[str, list[str]] = {}
  for p in old:
    by_module.setdefault(p.split("/", 1)[1].rsplit("/", 1)[0], []).append(p)
  values: dict[str, Any] = {}
  for k, group in enumerate(groups):
    g = sources[group.name]
    counts = np.bincount(g, minlength=group.width)
    for module in group.producers:
      for p in by_module.get(module, ()):  # absent modules (an mbconv without expansion) hold nothing
        values[p] = jnp.take(values.get(p, old[p]), jnp.asarray(g), axis=-1)
    for c, module in enumerate(group.consumers):
      p = f"params/{module}/kernel"
      kernel = np.asarray(values.get(p, old[p]))
      # Dividing by the copy count is what makes the consumers sum the copies back to the old value.
      new = np.take(kernel, g, axis=-2) / counts[g].reshape(-1, 1).astype(kernel.dtype)
      if noise:
        scale = noise * float(np.std(new))
        new = new + _zero_sum_noise(new, g, counts, scale, np.random.default_rng([seed, 1, k, c]))
      values[p] = jnp.asarray(new, kernel.dtype)
  return values


def _new_width(name: str, old: int, width: int | None, factor: float | None) -> int:
  if (width is None) == (factor is None):
    raise ValueError("give exactly one of width= (the new channel count) or factor= (a multiplier "
                     ">= 1)")
  if factor is not None:
    if not factor >= 1.0:
      raise ValueError(f"factor must be >= 1 (widening only adds channels), got {factor}")
    return int(round(old * factor))
  if not isinstance(width, int) or width < old:
    raise ValueError(f"cannot widen {name} to {width!r} channels: it has {old}, widening only adds "
                     "channels (prune_channels removes them)")
  return width


def _check_args(noise: float, seed: int) -> None:
  if not noise >= 0.0:
    raise ValueError(f"noise must be >= 0 (a std relative to the weights'), got {noise}")
  if not isinstance(seed, int) or seed < 0:
    raise ValueError(f"seed must be a non-negative int, got {seed!r}")


def _pick_sources(groups: Sequence[Group], targets: Mapping[str, int], given: Mapping[str, Any] | None,
                  seed: int) -> dict[str, np.ndarray]:
  """The source map of each group: from ``given`` (checked) or drawn from ``default_rng([seed, 0, k])``."""
  if given is not None:
    want = sorted(g.name for g in groups)
    if sorted(given) != want:
      raise ValueError(f"sources must have exactly the keys {want}, got {sorted(given)}")
    return {g.name: check_sources(g.name, given[g.name], g.width, targets[g.name]) for g in groups}
  return {g.name: draw_sources(g.width, targets[g.name], np.random.default_rng([seed, 0, k]))
          for k, g in enumerate(groups)}


# --------------------------------------------------------------------------------------------------
# Inner channels.


def widen(model: Model, blocks: str = ".*", *, width: int | None = None, factor: float | None = None,
          noise: float = 0.0, seed: int = 0, expect: int | None = None,
          sources: Mapping[str, Sequence[int]] | None = None) -> Model:
  """Returns ``model`` with the inner width of the selected blocks increased, computing the same function.

  Inner channels (``BLOCK_KINDS[kind].inner``): basic — conv1 out, bn1, conv2 in; bottleneck — the same
  plus conv2 out, bn2, conv3 in (each group with its own source map); mbconv — the expanded width
  (expand_conv out, bn0, depthwise conv, bn1, project_conv in). Block interfaces are unchanged.

  Args:
    model: never mutated; every leaf outside the widened modules is shared.
    blocks: regex over ``"<stage>/<block>"`` names.
    width: the new inner width of every selected block (>= its current one).
    factor: multiply each selected block's inner width instead (>= 1, rounded).
    noise: std of the zero-sum symmetry-breaking noise on the copies' outgoing weights, relative to
      those weights' std (0: exact copies).
    seed: seeds the source maps and the noise.
    expect: number of blocks ``blocks`` must match.
    sources: source map per group (``{"<block>/<producer conv>": [old index per new channel]}``), as
      recorded; default: drawn from ``seed``.

  Returns:
    A new Model; its history ends in a ``widen`` record holding ``sources``.

  Raises:
    PathError: the selector matches no block or not ``expect`` blocks.
    ValueError: both or neither of width/factor, narrowing, grouped convs, an ``mbconv`` without
      expansion conv (or widened to its input width), bad ``sources``, ``noise`` or ``seed``.
  """
  check_expect(expect)
  _check_args(noise, seed)
  spec = model.spec
  cins = block_inputs(spec)
  groups, targets, new_blocks = [], {}, {}
  for i, j in select_blocks(spec, blocks, expect):
    b = spec.stages[i].blocks[j]
    name = f"{spec.stages[i].name}/{b.name}"
    kind = block_kind(b.kind)
    if b.groups > 1:
      raise ValueError(f"cannot widen {name}: grouped convs (groups={b.groups}); widen the stage "
                       "(widen_stage) or replace the block")
    if kind.needs_expansion and b.width == cins[name]:
      raise ValueError(f"cannot widen the inner channels of {name}: it has no expansion conv (its "
                       "inner width is its input width); widen the stage feeding it with widen_stage")
    m = _new_width(name, b.width, width, factor)
    if kind.needs_expansion and m == cins[name]:
      raise ValueError(f"cannot widen {name} to {m} channels: equal to its input width, the expansion "
                       "conv would disappear; choose another width")
    for inner in kind.inner:
      g = Group(f"{name}/{inner.producer}", b.width, tuple(f"{name}/{p}" for p in inner.producers),
                (f"{name}/{inner.consumer}",))
      groups.append(g)
      targets[g.name] = m
    new_blocks[(i, j)] = dataclasses.replace(b, width=m)
  maps = _pick_sources(groups, targets, sources, seed)
  values = replicate(model.variables, groups, maps, noise, seed)
  record = op_record("widen", blocks=blocks, width=width, factor=factor, noise=float(noise), seed=seed,
                     expect=expect, sources={k: v.tolist() for k, v in maps.items()})
  return rebuild(model, with_blocks(spec, new_blocks), record, values=values)


# --------------------------------------------------------------------------------------------------
# Residual streams.


@dataclasses.dataclass
class Stream:
  """Channels shared through identity shortcuts (built by :func:`streams`; a private working value).

  Attributes:
    members: ``stem`` and the stages whose outputs it carries, in order; its name joins them by ``+``.
    width: channels.
    producers, consumers: as in :class:`Group`.
    writers: ``(stage index, block index)`` of the blocks whose ``out`` it is.
    followers: blocks without expansion conv reading it (their inner width is its width).
    head: the block that starts it (``None`` for the stem's).
    option_a: ``head`` has an option-A shortcut.
    source: index of the stream ``head`` reads.
  """

  members: list[str]
  width: int
  producers: list[str] = dataclasses.field(default_factory=list)
  consumers: list[str] = dataclasses.field(default_factory=list)
  writers: list[tuple[int, int]] = dataclasses.field(default_factory=list)
  followers: list[tuple[int, int]] = dataclasses.field(default_factory=list)
  head: str | None = None
  option_a: bool = False
  source: int | None = None

  @property
  def name(self) -> str:
    return "+".join(self.members)

  def group(self) -> Group:
    return Group(self.name, self.width, tuple(self.producers), tuple(self.consumers))


def streams(spec: ModelSpec) -> list[Stream]:
  """Returns the residual streams of ``spec`` in network order (the first is the stem's); ``spec`` is
  only read."""
  out = [Stream(["stem"], spec.stem.width, ["stem/conv", "stem/bn"])]
  for i, st in enumerate(spec.stages):
    for j, b in enumerate(st.blocks):
      name, kind, src = f"{st.name}/{b.name}", block_kind(b.kind), out[-1]
      if kind.needs_expansion and b.width == src.width:
        for inner in kind.inner:  # the expansion conv is absent: the group rides on the stream
          src.producers += [f"{name}/{p}" for p in inner.producers]
          src.consumers.append(f"{name}/{inner.consumer}")
        src.followers.append((i, j))
      else:
        src.consumers.append(f"{name}/{kind.input_conv}")
      dst = src
      if b.stride != 1 or b.out != src.width:
        projected = b.kind != "mbconv" and spec.shortcut == "conv"
        dst = Stream([], b.out, head=name, source=len(out) - 1,
                     option_a=b.kind != "mbconv" and spec.shortcut == "option_a")
        if projected:
          src.consumers.append(f"{name}/downsample_conv")
          dst.producers += [f"{name}/downsample_conv", f"{name}/downsample_bn"]
        out.append(dst)
      if st.name not in dst.members:
        dst.members.append(st.name)
      dst.producers += [f"{name}/{kind.output_conv}", f"{name}/{kind.last_bn}"]
      dst.writers.append((i, j))
      if b.adapter:  # x + up(act(down(x))) on the block's output
        dst.producers.append(f"{name}/adapter/up")
        dst.consumers.append(f"{name}/adapter/down")
  out[-1].consumers += (["neck_conv"] if spec.neck_width
                        else [head_module_name(h.name) for h in spec.heads])
  return out


def option_a_sources(s: Stream, cin: int, inputs: np.ndarray | None, m: int,
                     rng: np.random.Generator, given: Any = None) -> np.ndarray:
  """The source map of stream ``s`` (``s.width`` channels, started by an option-A shortcut from ``cin``
  channels) widened to ``m`` while its input is widened by ``inputs`` (``None``: not widened).

  The shortcut writes input channel ``c`` to output ``(out - cin) // 2 + c`` and zeros elsewhere, so new
  output channels there copy the old outputs of the input's sources, and the zero-padded new channels
  copy old zero-padded ones (all of them in order, then random copies; ``given`` — recorded sources —
  fixes those copies instead).

  Raises:
    ValueError: too few zero-padded channels left to copy the old ones, naming the block and the fix;
      ``given`` sources that break the shortcut's positions.
  """
  n = s.width
  inputs = np.arange(cin, dtype=np.int64) if inputs is None else inputs
  lo, lo_new = (n - cin) // 2, (m - len(inputs)) // 2
  pad_old = np.r_[0:lo, lo + cin:n].astype(np.int64)
  pad_new = np.r_[0:lo_new, lo_new + len(inputs):m].astype(np.int64)
  if len(pad_new) < len(pad_old) or (len(pad_new) and not len(pad_old)) or m < len(inputs):
    need = len(inputs) + n - cin
    raise ValueError(
        f"cannot widen {s.name} to {m} channels: {s.head} has an option-A shortcut (parameter-free zero "
        f"padding), which places its {len(inputs)} input channels at fixed output positions, so "
        f"{s.name} needs exactly {need}" + ("" if not len(pad_old) else " or more") + " channels "
        f"(its {n} plus the {len(inputs) - cin} new input channels); widen it in the same call (e.g. "
        "widen_stage with one factor for every stage) or use a network with conv shortcuts")
  g = np.empty(m, np.int64)
  g[lo_new:lo_new + len(inputs)] = lo + inputs
  g[pad_new[:len(pad_old)]] = pad_old
  g[pad_new[len(pad_old):]] = pad_old[_copies(len(pad_old), len(pad_new) - len(pad_old), rng)]
  if given is None:
    return g
  given = check_sources(s.name, given, n, m)
  if (not np.array_equal(given[lo_new:lo_new + len(inputs)], g[lo_new:lo_new + len(inputs)])
      or set(given[pad_new].tolist()) != set(pad_old.tolist())):
    raise ValueError(f"sources[{s.name!r}] breaks the option-A shortcut of {s.head}: entries "
                     f"{lo_new}…{lo_new + len(inputs) - 1} must copy the shortcut's channels and the "
                     "others the old zero-padded ones; pass the sources a widen_stage record holds")
  return given


def _stream_targets(ss: Sequence[Stream], spec: ModelSpec, stages: str, out: int | None,
                    factor: float | None) -> dict[int, int]:
  """Stream index → new width of every stream a name matched by ``stages`` belongs to."""
  names = ["stem"] + [st.name for st in spec.stages]
  picked = paths.select(names, stages)
  if out is not None and len(picked) > 1:
    raise ValueError(f"out= widens one stage, but {stages!r} matched {picked}; use factor= or one "
                     "stage per call")
  targets: dict[int, int] = {}
  for name in picked:
    hits = [k for k, s in enumerate(ss) if name in s.members]
    if not hits:
      raise ValueError(f"cannot widen {name}: it has no blocks")
    if len(hits) != 1:
      raise ValueError(f"cannot widen {name}: its blocks do not share one output width (streams "
                       f"{[ss[k].name for k in hits]}); widen_stage needs a stage whose blocks after "
                       "the first keep their shape")
    k = hits[0]
    m = _new_width(ss[k].name, ss[k].width, out, factor)
    if targets.get(k, m) != m:
      raise ValueError(f"{ss[k].name} is one residual stream and cannot get two widths")
    targets[k] = m
  return targets


def _stream_sources(ss: Sequence[Stream], targets: Mapping[int, int],
                    given: Mapping[str, Any] | None, seed: int) -> dict[int, np.ndarray]:
  """Stream index → source map of every stream that changes (option-A positions kept)."""
  if given is not None:
    unknown = sorted(set(given) - {s.name for s in ss})
    if unknown:
      raise ValueError(f"sources names no stream {unknown}; streams: {[s.name for s in ss]}")
  maps: dict[int, np.ndarray] = {}
  for k, s in enumerate(ss):
    m = targets.get(k, s.width)
    rng = np.random.default_rng([seed, 0, k])
    if s.option_a and (s.source in maps or k in targets):
      g = option_a_sources(s, ss[s.source].width, maps.get(s.source), m, rng,
                           None if given is None else given.get(s.name))
    elif m > s.width:
      g = (check_sources(s.name, given[s.name], s.width, m) if given is not None and s.name in given
           else draw_sources(s.width, m, rng))
    else:
      continue
    maps[k] = g
  unused = sorted(set(given or ()) - {ss[k].name for k in maps})
  if unused:
    raise ValueError(f"sources given for streams this call does not widen: {unused}")
  return maps


def _widened_spec(spec: ModelSpec, ss: Sequence[Stream], maps: Mapping[int, np.ndarray]) -> ModelSpec:
  """``spec`` with each changed stream's new width on the stem / blocks that write it, and as the inner
  width of the blocks without expansion conv that read it."""
  new_blocks: dict[tuple[int, int], Any] = {}
  stem = spec.stem
  for k, g in maps.items():
    s = ss[k]
    if k == 0:
      stem = dataclasses.replace(stem, width=len(g))
    for i, j in s.writers:
      new_blocks[(i, j)] = dataclasses.replace(new_blocks.get((i, j), spec.stages[i].blocks[j]),
                                               out=len(g))
    for i, j in s.followers:
      new_blocks[(i, j)] = dataclasses.replace(new_blocks.get((i, j), spec.stages[i].blocks[j]),
                                               width=len(g))
  new = dataclasses.replace(with_blocks(spec, new_blocks), stem=stem)
  cins = block_inputs(new)
  for i, st in enumerate(new.stages):
    for j, b in enumerate(st.blocks):
      name = f"{st.name}/{b.name}"
      followed = any((i, j) in s.followers for s in ss)
      if block_kind(b.kind).needs_expansion and not followed and b.width == cins[name]:
        raise ValueError(f"cannot widen the stream {name} reads to {cins[name]} channels: equal to "
                         "its expanded width, its expansion conv would disappear; choose another "
                         "width")
  return new


def widen_stage(model: Model, stages: str, *, out: int | None = None, factor: float | None = None,
                noise: float = 0.0, seed: int = 0,
                sources: Mapping[str, Sequence[int]] | None = None) -> Model:
  """Returns ``model`` with wider residual streams (stage output widths), computing the same function.

  A stage's stream is every block output joined to it by identity shortcuts, so it can include the stem
  (CIFAR ResNets, ResNet-18's ``layer1``) or span stages; all of it is widened, with the same source
  map: each block's last conv and BN, the first block's downsample conv and BN, the blocks' first convs
  (or, without expansion conv, an mbconv's depthwise conv, BN and projection), the next stage's first
  block and its downsample conv, adapters, the neck conv or the heads. A stage after an option-A
  shortcut keeps its input channels' positions (see :func:`option_a_sources`).

  Args:
    model: never mutated; every leaf outside the widened modules is shared.
    stages: regex over ``stem`` and the stage names (``layer2``, ``layer[123]``, ``.*``).
    out: the new width of the one stage matched (>= its current one).
    factor: multiply each matched stage's width instead (>= 1, rounded); one factor for every stage
      widens option-A ResNets.
    noise: std of the zero-sum symmetry-breaking noise on the copies' outgoing weights, relative to
      those weights' std (0: exact copies).
    seed: seeds the source maps and the noise.
    sources: source map per stream name (``stem+layer1``, ``layer2``), as recorded; default: drawn.

  Returns:
    A new Model; its history ends in a ``widen_stage`` record holding every changed stream's ``sources``.

  Raises:
    PathError: ``stages`` matches nothing.
    ValueError: both or neither of out/factor, narrowing, ``out`` for several stages, a stage whose blocks
      change width, an option-A shortcut that cannot keep its positions (naming the block and the fix),
      bad ``sources``, ``noise`` or ``seed``.
  """
  _check_args(noise, seed)
  spec = model.spec
  ss = streams(spec)
  maps = _stream_sources(ss, _stream_targets(ss, spec, stages, out, factor), sources, seed)
  new_spec = _widened_spec(spec, ss, maps)
  groups = [ss[k].group() for k in sorted(maps)]
  values = replicate(model.variables, groups, {ss[k].name: g for k, g in maps.items()}, noise, seed)
  record = op_record("widen_stage", stages=stages, out=out, factor=factor, noise=float(noise),
                     seed=seed, sources={ss[k].name: maps[k].tolist() for k in sorted(maps)})
  return rebuild(model, new_spec, record, values=values)
