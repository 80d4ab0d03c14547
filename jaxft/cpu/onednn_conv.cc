// oneDNN convolutions for XLA:CPU, as XLA FFI custom calls (see jaxft/cpu/onednn.py).
//
// Three handlers, NHWC activations and HWIO kernels (jaxft's layouts; with G groups the kernel is
// [KH, KW, C/G, O] and output channel o belongs to group o / (O/G)), no dilation, explicit
// non-negative padding:
//   jaxft_onednn_conv_fwd          y  = conv(x, k)
//   jaxft_onednn_conv_bwd_data     dx = d conv / dx applied to dy
//   jaxft_onednn_conv_bwd_weights  dk = d conv / dk applied to dy
// and two inference-only ones with an epilogue fused in (see "Inference convolution" below):
//   jaxft_onednn_conv_bias         y  = act(conv(x, k) + bias)
//   jaxft_onednn_conv_bias_add     y  = act(conv(x, k) + bias + residual)
// Data types: activations (x, y and their gradients) are all float32 or all bfloat16; the kernel (and
// its gradient, which has the kernel's type) is float32 or bfloat16 independently. bfloat16 activations
// compute in bfloat16 with float32 accumulation (oneDNN's AMX / AVX512-BF16 kernels), so a float32
// master kernel is converted by the reorder into the primitive's layout that happens anyway, and its
// gradient is accumulated and returned in float32: no separate cast pass, no bfloat16 gradient rounding.
// oneDNN picks its own weights layout (usually blocked); the HWIO kernel is reordered into it (and the
// kernel gradient out of it) on every call, which costs little next to the convolution itself.
// Two more run max pooling for training, the gradient routed by the forward's argmax workspace:
//   jaxft_onednn_pool_fwd  x -> (y, workspace)
//   jaxft_onednn_pool_bwd  (dy, workspace) -> dx
// (Training-mode batch normalization is batch_norm.cc's, not oneDNN's; it shares RunMutex.)
// Primitives are built once per geometry and cached. XLA runs independent thunks concurrently on its
// threads; calls here run one at a time (see Run), and every primitive is built with a user-managed
// scratchpad that each call allocates for itself, so that no state is shared between executions even
// without that lock (oneDNN allows concurrent execution of one primitive only that way).
// Inputs are never written.

#include <cstdint>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using dnnl::memory;
using Tag = dnnl::memory::format_tag;
using Dt = dnnl::memory::data_type;

enum Pass { kForward = 0, kBackwardData = 1, kBackwardWeights = 2 };

dnnl::engine& Engine() {
  static dnnl::engine* engine = new dnnl::engine(dnnl::engine::kind::cpu, 0);
  return *engine;
}

// One convolution's shapes: x [n, h, w, c], k [kh, kw, c / g, o], y [n, oh, ow, o]; g groups; the
// activations' data type (x, y and their gradients) and the user kernel's.
struct Geometry {
  int64_t n, h, w, c, kh, kw, o, oh, ow, sh, sw, pt, pb, pl, pr, g;
  Dt act, ker;

  memory::dims src() const { return {n, c, h, w}; }
  memory::dims wei() const {
    if (g == 1) return {o, c, kh, kw};
    return {g, o / g, c / g, kh, kw};
  }
  memory::dims dst() const { return {n, o, oh, ow}; }
  memory::dims strides() const { return {sh, sw}; }
  memory::dims pad_l() const { return {pt, pl}; }
  memory::dims pad_r() const { return {pb, pr}; }
  memory::desc src_md() const { return memory::desc(src(), act, Tag::nhwc); }
  memory::desc dst_md() const { return memory::desc(dst(), act, Tag::nhwc); }
  memory::desc user_wei_md() const {
    return memory::desc(wei(), ker, g == 1 ? Tag::hwio : Tag::hwigo);
  }
  // The primitive's weights: in the activations' type (bf16 kernels for bf16 compute)...
  memory::desc any_wei_md() const { return memory::desc(wei(), act, Tag::any); }
  // ...and its kernel gradient in the user kernel's type (float32 accumulation kept for f32 masters).
  memory::desc any_diff_wei_md() const { return memory::desc(wei(), ker, Tag::any); }

  std::string Key(Pass pass) const {
    std::string key = std::to_string(static_cast<int>(pass)) + ',' +
                      std::to_string(static_cast<int>(act)) + ',' +
                      std::to_string(static_cast<int>(ker));
    for (int64_t v : {n, h, w, c, kh, kw, o, oh, ow, sh, sw, pt, pb, pl, pr, g}) {
      key += ',' + std::to_string(v);
    }
    return key;
  }
};

struct Primitive {
  dnnl::primitive primitive;
  memory::desc wei_md;         // the primitive's own weights layout
  memory::desc scratchpad_md;  // the workspace one execution needs
};

dnnl::primitive_attr Attr() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

#if DNNL_VERSION_MAJOR >= 3
dnnl::convolution_forward::primitive_desc ForwardPd(const Geometry& g) {
  return dnnl::convolution_forward::primitive_desc(
      Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, g.src_md(),
      g.any_wei_md(), g.dst_md(), g.strides(), g.pad_l(), g.pad_r(), Attr());
}
dnnl::convolution_backward_data::primitive_desc BackwardDataPd(const Geometry& g) {
  return dnnl::convolution_backward_data::primitive_desc(
      Engine(), dnnl::algorithm::convolution_direct, g.src_md(), g.any_wei_md(), g.dst_md(),
      g.strides(), g.pad_l(), g.pad_r(), ForwardPd(g), Attr());
}
dnnl::convolution_backward_weights::primitive_desc BackwardWeightsPd(const Geometry& g) {
  return dnnl::convolution_backward_weights::primitive_desc(
      Engine(), dnnl::algorithm::convolution_direct, g.src_md(), g.any_diff_wei_md(), g.dst_md(),
      g.strides(), g.pad_l(), g.pad_r(), ForwardPd(g), Attr());
}
#else
dnnl::convolution_forward::primitive_desc ForwardPd(const Geometry& g) {
  dnnl::convolution_forward::desc d(dnnl::prop_kind::forward_training,
                                    dnnl::algorithm::convolution_direct, g.src_md(), g.any_wei_md(),
                                    g.dst_md(), g.strides(), g.pad_l(), g.pad_r());
  return dnnl::convolution_forward::primitive_desc(d, Attr(), Engine());
}
dnnl::convolution_backward_data::primitive_desc BackwardDataPd(const Geometry& g) {
  dnnl::convolution_backward_data::desc d(dnnl::algorithm::convolution_direct, g.src_md(),
                                          g.any_wei_md(), g.dst_md(), g.strides(), g.pad_l(),
                                          g.pad_r());
  return dnnl::convolution_backward_data::primitive_desc(d, Attr(), Engine(), ForwardPd(g));
}
dnnl::convolution_backward_weights::primitive_desc BackwardWeightsPd(const Geometry& g) {
  dnnl::convolution_backward_weights::desc d(dnnl::algorithm::convolution_direct, g.src_md(),
                                             g.any_diff_wei_md(), g.dst_md(), g.strides(),
                                             g.pad_l(), g.pad_r());
  return dnnl::convolution_backward_weights::primitive_desc(d, Attr(), Engine(), ForwardPd(g));
}
#endif

std::shared_ptr<const Primitive> Build(const Geometry& g, Pass pass) {
  auto p = std::make_shared<Primitive>();
  if (pass == kForward) {
    auto pd = ForwardPd(g);
    p->primitive = dnnl::convolution_forward(pd);
    p->wei_md = pd.weights_desc();
    p->scratchpad_md = pd.scratchpad_desc();
  } else if (pass == kBackwardData) {
    auto pd = BackwardDataPd(g);
    p->primitive = dnnl::convolution_backward_data(pd);
    p->wei_md = pd.weights_desc();
    p->scratchpad_md = pd.scratchpad_desc();
  } else {
    auto pd = BackwardWeightsPd(g);
    p->primitive = dnnl::convolution_backward_weights(pd);
    p->wei_md = pd.diff_weights_desc();
    p->scratchpad_md = pd.scratchpad_desc();
  }
  return p;
}

// The primitive cached under `key`, built by `build()` on first use. Each primitive type P has its
// own cache (keys are unique per type anyway).
template <typename P, typename Builder>
std::shared_ptr<const P> FromCache(const std::string& key, Builder build) {
  static std::mutex* mu = new std::mutex;
  static auto* cache = new std::unordered_map<std::string, std::shared_ptr<const P>>;
  {
    std::lock_guard<std::mutex> lock(*mu);
    auto it = cache->find(key);
    if (it != cache->end()) return it->second;
  }
  std::shared_ptr<const P> p = build();  // outside the lock: building can take milliseconds
  std::lock_guard<std::mutex> lock(*mu);
  return cache->emplace(key, p).first->second;
}

std::shared_ptr<const Primitive> Cached(const Geometry& g, Pass pass) {
  return FromCache<Primitive>(g.Key(pass), [&] { return Build(g, pass); });
}

// One oneDNN primitive at a time: each already spreads over every core (oneDNN's OpenMP team), and
// XLA would otherwise start two independent ones at once (a layer's input and kernel gradients)
// and oversubscribe the cores (measured gain: docs/benchmarks.md, fifth session).
}  // namespace

namespace jaxft {
std::mutex& RunMutex() {  // also taken by batch_norm.cc's multi-threaded loops
  static std::mutex* mu = new std::mutex;
  return *mu;
}
}  // namespace jaxft

namespace {

using jaxft::RunMutex;

// x, k, y as in Dispatch.
ffi::Error Run(Pass pass, const Geometry& g, void* x, void* k, void* y) {
  try {
    auto p = Cached(g, pass);
    std::lock_guard<std::mutex> run_lock(RunMutex());
    dnnl::stream stream(Engine());
    memory xm(g.src_md(), Engine(), x), ym(g.dst_md(), Engine(), y);
    memory km(g.user_wei_md(), Engine(), k);
    const bool reorder = p->wei_md != g.user_wei_md();
    memory wm = reorder ? memory(p->wei_md, Engine()) : km;
    memory scratch(p->scratchpad_md, Engine());
    if (pass == kForward) {
      if (reorder) dnnl::reorder(km, wm).execute(stream, km, wm);
      p->primitive.execute(stream, {{DNNL_ARG_SRC, xm}, {DNNL_ARG_WEIGHTS, wm}, {DNNL_ARG_DST, ym},
                                    {DNNL_ARG_SCRATCHPAD, scratch}});
    } else if (pass == kBackwardData) {
      if (reorder) dnnl::reorder(km, wm).execute(stream, km, wm);
      p->primitive.execute(stream, {{DNNL_ARG_DIFF_SRC, xm}, {DNNL_ARG_WEIGHTS, wm},
                                    {DNNL_ARG_DIFF_DST, ym}, {DNNL_ARG_SCRATCHPAD, scratch}});
    } else {
      p->primitive.execute(stream, {{DNNL_ARG_SRC, xm}, {DNNL_ARG_DIFF_WEIGHTS, wm},
                                    {DNNL_ARG_DIFF_DST, ym}, {DNNL_ARG_SCRATCHPAD, scratch}});
      if (reorder) dnnl::reorder(wm, km).execute(stream, wm, km);
    }
    stream.wait();
  } catch (const std::exception& e) {  // dnnl::error, bad_alloc, ...: never let one cross into XLA
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("jaxft oneDNN convolution: ") + e.what());
  } catch (...) {
    return ffi::Error(ffi::ErrorCode::kInternal, "jaxft oneDNN convolution: unknown exception");
  }
  return ffi::Error::Success();
}

// The shapes must describe one convolution: oneDNN trusts them and never sees the buffers' sizes.
ffi::Error Check(ffi::Span<const int64_t> x, ffi::Span<const int64_t> k, ffi::Span<const int64_t> y,
                 ffi::Span<const int64_t> strides, ffi::Span<const int64_t> padding,
                 int64_t groups) {
  for (int i = 0; i < 4; ++i) {
    if (x[i] < 1 || k[i] < 1 || y[i] < 1) return ffi::Error::InvalidArgument("empty array");
  }
  if (groups < 1 || x[3] % groups != 0 || k[3] % groups != 0) {
    return ffi::Error::InvalidArgument("groups must divide the input and output channels");
  }
  if (strides.size() != 2 || padding.size() != 4) {
    return ffi::Error::InvalidArgument("strides must have 2 entries and padding 4");
  }
  if (strides[0] < 1 || strides[1] < 1) return ffi::Error::InvalidArgument("strides must be >= 1");
  for (int i = 0; i < 4; ++i) {
    if (padding[i] < 0) return ffi::Error::InvalidArgument("padding must be >= 0");
  }
  const int64_t ph = x[1] + padding[0] + padding[1], pw = x[2] + padding[2] + padding[3];
  if (k[2] * groups != x[3] || y[0] != x[0] || y[3] != k[3] || ph < k[0] || pw < k[1] ||
      y[1] != (ph - k[0]) / strides[0] + 1 || y[2] != (pw - k[1]) / strides[1] + 1) {
    return ffi::Error::InvalidArgument(
        "input [N,H,W,C], kernel [KH,KW,C/G,O] and output [N,OH,OW,O] shapes do not describe one "
        "convolution with these strides, padding and G groups");
  }
  return ffi::Error::Success();
}

// The oneDNN data type of an XLA buffer, or nothing for a type these handlers do not take.
bool ToDnnl(ffi::DataType t, Dt* out) {
  if (t == ffi::DataType::F32) {
    *out = Dt::f32;
  } else if (t == ffi::DataType::BF16) {
    *out = Dt::bf16;
  } else {
    return false;
  }
  return true;
}

using Buffer = ffi::AnyBuffer;

// x, k, y are the forward pass's operands, whichever of them this pass reads or writes.
ffi::Error Dispatch(Pass pass, const Buffer& x, const Buffer& k, const Buffer& y,
                    ffi::Span<const int64_t> strides, ffi::Span<const int64_t> padding,
                    int64_t groups) {
  auto xd = x.dimensions(), kd = k.dimensions(), yd = y.dimensions();
  if (xd.size() != 4 || kd.size() != 4 || yd.size() != 4) {
    return ffi::Error::InvalidArgument("input, kernel and output must be 4-D");
  }
  Dt act, ker, out;
  if (!ToDnnl(x.element_type(), &act) || !ToDnnl(y.element_type(), &out) ||
      !ToDnnl(k.element_type(), &ker)) {
    return ffi::Error::InvalidArgument("arrays must be float32 or bfloat16");
  }
  if (act != out) {
    return ffi::Error::InvalidArgument("input and output (and their gradients) must share a type");
  }
  if (auto e = Check(xd, kd, yd, strides, padding, groups); e.failure()) return e;
  const Geometry g{xd[0], xd[1], xd[2], xd[3], kd[0], kd[1], kd[3], yd[1], yd[2], strides[0],
                   strides[1], padding[0], padding[1], padding[2], padding[3], groups, act, ker};
  return Run(pass, g, x.untyped_data(), k.untyped_data(), y.untyped_data());
}

ffi::Error Forward(Buffer x, Buffer k, ffi::Result<Buffer> y, ffi::Span<const int64_t> strides,
                   ffi::Span<const int64_t> padding, int64_t groups) {
  return Dispatch(kForward, x, k, *y, strides, padding, groups);
}

ffi::Error BackwardData(Buffer dy, Buffer k, ffi::Result<Buffer> dx,
                        ffi::Span<const int64_t> strides, ffi::Span<const int64_t> padding,
                        int64_t groups) {
  return Dispatch(kBackwardData, *dx, k, dy, strides, padding, groups);
}

ffi::Error BackwardWeights(Buffer x, Buffer dy, ffi::Result<Buffer> dk,
                           ffi::Span<const int64_t> strides, ffi::Span<const int64_t> padding,
                           int64_t groups) {
  return Dispatch(kBackwardWeights, x, *dk, dy, strides, padding, groups);
}


// ---------------------------------------------------------------------------------------------------
// Inference convolution with its epilogue: y = act(conv(x, k) + bias [+ residual]), in one pass,
// computed in float32 before the one rounding to y's type: the bias per output channel, the residual
// as a binary-add post-op, the activation as an eltwise post-op. A BatchNorm with running statistics
// after the convolution is this with k scaled by scale / sqrt(var + eps) per output channel (by the
// caller) and bias = its shift: a convolution, BatchNorm, residual add and activation of an inference
// step with no separate pass over the output for each. Measured on oneDNN 2.6's bfloat16 kernels
// (docs/benchmarks.md, "epilogue"): the bias and eltwise are free, a binary add of a full tensor
// costs ~10% (up to 2x in the AVX2 kernels, where the caller leaves residuals out), while
// per-channel binary mul/add post-ops and the sum post-op (the other way to add a residual) cost
// 50-150% on 1x1 convolutions, more than the separate pass they replace.
// act: 0 identity, 1 ReLU, 2 ReLU6.

enum Act { kIdentity = 0, kRelu = 1, kRelu6 = 2 };

struct Epilogue {
  int64_t act;
  bool residual;
  std::string Key() const { return ",e" + std::to_string(act) + (residual ? "r" : "n"); }
};

dnnl::primitive_attr EpilogueAttr(const Geometry& g, const Epilogue& e) {
  dnnl::post_ops ops;
  if (e.residual) ops.append_binary(dnnl::algorithm::binary_add, g.dst_md());
#if DNNL_VERSION_MAJOR >= 3
  if (e.act == kRelu) ops.append_eltwise(dnnl::algorithm::eltwise_relu, 0.f, 0.f);
  if (e.act == kRelu6) ops.append_eltwise(dnnl::algorithm::eltwise_clip, 0.f, 6.f);
#else
  if (e.act == kRelu) ops.append_eltwise(1.f, dnnl::algorithm::eltwise_relu, 0.f, 0.f);
  if (e.act == kRelu6) ops.append_eltwise(1.f, dnnl::algorithm::eltwise_clip, 0.f, 6.f);
#endif
  dnnl::primitive_attr attr = Attr();
  attr.set_post_ops(ops);
  return attr;
}

memory::desc BiasMd(const Geometry& g) { return memory::desc({g.o}, Dt::f32, Tag::a); }

#if DNNL_VERSION_MAJOR >= 3
dnnl::convolution_forward::primitive_desc EpiloguePd(const Geometry& g, const Epilogue& e) {
  return dnnl::convolution_forward::primitive_desc(
      Engine(), dnnl::prop_kind::forward_inference, dnnl::algorithm::convolution_direct, g.src_md(),
      g.any_wei_md(), BiasMd(g), g.dst_md(), g.strides(), g.pad_l(), g.pad_r(),
      EpilogueAttr(g, e));
}
#else
dnnl::convolution_forward::primitive_desc EpiloguePd(const Geometry& g, const Epilogue& e) {
  dnnl::convolution_forward::desc d(dnnl::prop_kind::forward_inference,
                                    dnnl::algorithm::convolution_direct, g.src_md(), g.any_wei_md(),
                                    BiasMd(g), g.dst_md(), g.strides(), g.pad_l(), g.pad_r());
  return dnnl::convolution_forward::primitive_desc(d, EpilogueAttr(g, e), Engine());
}
#endif

std::shared_ptr<const Primitive> CachedEpilogue(const Geometry& g, const Epilogue& e) {
  return FromCache<Primitive>(g.Key(kForward) + e.Key(), [&] {
    auto p = std::make_shared<Primitive>();
    auto pd = EpiloguePd(g, e);
    p->primitive = dnnl::convolution_forward(pd);
    p->wei_md = pd.weights_desc();
    p->scratchpad_md = pd.scratchpad_desc();
    return std::shared_ptr<const Primitive>(p);
  });
}

ffi::Error ForwardEpilogue(const Buffer& x, const Buffer& k, const ffi::Buffer<ffi::F32, 1>& bias,
                           const Buffer* residual, const Buffer& y,
                           ffi::Span<const int64_t> strides, ffi::Span<const int64_t> padding,
                           int64_t groups, int64_t act) {
  auto xd = x.dimensions(), kd = k.dimensions(), yd = y.dimensions();
  if (xd.size() != 4 || kd.size() != 4 || yd.size() != 4) {
    return ffi::Error::InvalidArgument("input, kernel and output must be 4-D");
  }
  Dt at, kt, yt;
  if (!ToDnnl(x.element_type(), &at) || !ToDnnl(y.element_type(), &yt) ||
      !ToDnnl(k.element_type(), &kt) || at != yt) {
    return ffi::Error::InvalidArgument("input and output must share a type (float32 or bfloat16)");
  }
  if (auto e = Check(xd, kd, yd, strides, padding, groups); e.failure()) return e;
  if (bias.dimensions()[0] != yd[3]) {
    return ffi::Error::InvalidArgument("the bias must have one entry per output channel");
  }
  if (act < kIdentity || act > kRelu6) return ffi::Error::InvalidArgument("unknown activation");
  if (residual != nullptr) {
    auto rd = residual->dimensions();
    if (rd.size() != 4 || residual->element_type() != y.element_type() ||
        rd[0] != yd[0] || rd[1] != yd[1] || rd[2] != yd[2] || rd[3] != yd[3]) {
      return ffi::Error::InvalidArgument("the residual must have the output's shape and type");
    }
  }
  const Geometry g{xd[0], xd[1], xd[2], xd[3], kd[0], kd[1], kd[3], yd[1], yd[2], strides[0],
                   strides[1], padding[0], padding[1], padding[2], padding[3], groups, at, kt};
  const Epilogue e{act, residual != nullptr};
  try {
    auto p = CachedEpilogue(g, e);
    std::lock_guard<std::mutex> run_lock(RunMutex());
    dnnl::stream stream(Engine());
    memory xm(g.src_md(), Engine(), x.untyped_data()), ym(g.dst_md(), Engine(), y.untyped_data());
    memory km(g.user_wei_md(), Engine(), k.untyped_data());
    memory bm(BiasMd(g), Engine(), const_cast<float*>(bias.typed_data()));
    const bool reorder = p->wei_md != g.user_wei_md();
    memory wm = reorder ? memory(p->wei_md, Engine()) : km;
    memory scratch(p->scratchpad_md, Engine());
    if (reorder) dnnl::reorder(km, wm).execute(stream, km, wm);
    std::unordered_map<int, memory> args{{DNNL_ARG_SRC, xm}, {DNNL_ARG_WEIGHTS, wm},
                                         {DNNL_ARG_BIAS, bm}, {DNNL_ARG_DST, ym},
                                         {DNNL_ARG_SCRATCHPAD, scratch}};
    if (residual != nullptr) {
      args.insert({DNNL_ARG_ATTR_MULTIPLE_POST_OP(0) | DNNL_ARG_SRC_1,
                   memory(g.dst_md(), Engine(), residual->untyped_data())});
    }
    p->primitive.execute(stream, args);
    stream.wait();
  } catch (const std::exception& ex) {
    return ffi::Error(ffi::ErrorCode::kInternal,
                      std::string("jaxft oneDNN convolution epilogue: ") + ex.what());
  } catch (...) {
    return ffi::Error(ffi::ErrorCode::kInternal, "jaxft oneDNN convolution epilogue: unknown exception");
  }
  return ffi::Error::Success();
}

ffi::Error ConvBias(Buffer x, Buffer k, ffi::Buffer<ffi::F32, 1> bias, ffi::Result<Buffer> y,
                    ffi::Span<const int64_t> strides, ffi::Span<const int64_t> padding,
                    int64_t groups, int64_t act) {
  return ForwardEpilogue(x, k, bias, nullptr, *y, strides, padding, groups, act);
}

ffi::Error ConvBiasAdd(Buffer x, Buffer k, ffi::Buffer<ffi::F32, 1> bias, Buffer residual,
                       ffi::Result<Buffer> y, ffi::Span<const int64_t> strides,
                       ffi::Span<const int64_t> padding, int64_t groups, int64_t act) {
  return ForwardEpilogue(x, k, bias, &residual, *y, strides, padding, groups, act);
}

// ---------------------------------------------------------------------------------------------------
// Max pooling (training): y = max over k x k windows with stride s, padding p (padded taps never win,
// torch's MaxPool2d), and its gradient routed to the tap the forward chose (oneDNN keeps it in a
// workspace, the first maximal tap of each window, as torch). XLA:CPU evaluated the gradient as one
// fused loop over the input with all k² dilated taps and their argmax per element (docs/benchmarks.md,
// "BatchNorm by hand, ReLU's derivative from its output, the max-pool by oneDNN"). The backward pass
// reads only dy and the workspace: x itself need not be kept for it.

struct PoolGeometry {
  int64_t n, h, w, c, oh, ow, k, s, p;
  Dt act;

  // The geometry of a k x k / s max-pool padded p on each side of an [n, h, w, c] input.
  static PoolGeometry Of(int64_t n, int64_t h, int64_t w, int64_t c, int64_t k, int64_t s,
                         int64_t p, Dt act) {
    return {n, h, w, c, (h + 2 * p - k) / s + 1, (w + 2 * p - k) / s + 1, k, s, p, act};
  }

  memory::desc src_md() const { return memory::desc({n, c, h, w}, act, Tag::nhwc); }
  memory::desc dst_md() const { return memory::desc({n, c, oh, ow}, act, Tag::nhwc); }
  memory::dims pad_r() const {
    return {(oh - 1) * s + k - h - p, (ow - 1) * s + k - w - p};
  }
  std::string Key(bool backward) const {
    std::string key = backward ? "poolb" : "poolf";
    for (int64_t v : {n, h, w, c, oh, ow, k, s, p, static_cast<int64_t>(act)}) {
      key += ',' + std::to_string(v);
    }
    return key;
  }
};

#if DNNL_VERSION_MAJOR >= 3
dnnl::pooling_forward::primitive_desc PoolForwardPd(const PoolGeometry& g) {
  return dnnl::pooling_forward::primitive_desc(
      Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::pooling_max, g.src_md(),
      g.dst_md(), {g.s, g.s}, {g.k, g.k}, {0, 0}, {g.p, g.p}, g.pad_r(), Attr());
}
dnnl::pooling_backward::primitive_desc PoolBackwardPd(const PoolGeometry& g) {
  return dnnl::pooling_backward::primitive_desc(
      Engine(), dnnl::algorithm::pooling_max, g.src_md(), g.dst_md(), {g.s, g.s}, {g.k, g.k}, {0, 0},
      {g.p, g.p}, g.pad_r(), PoolForwardPd(g), Attr());
}
#else
dnnl::pooling_forward::primitive_desc PoolForwardPd(const PoolGeometry& g) {
  dnnl::pooling_forward::desc d(dnnl::prop_kind::forward_training, dnnl::algorithm::pooling_max,
                                g.src_md(), g.dst_md(), {g.s, g.s}, {g.k, g.k}, {g.p, g.p},
                                g.pad_r());
  return dnnl::pooling_forward::primitive_desc(d, Attr(), Engine());
}
dnnl::pooling_backward::primitive_desc PoolBackwardPd(const PoolGeometry& g) {
  dnnl::pooling_backward::desc d(dnnl::algorithm::pooling_max, g.src_md(), g.dst_md(), {g.s, g.s},
                                 {g.k, g.k}, {g.p, g.p}, g.pad_r());
  return dnnl::pooling_backward::primitive_desc(d, Attr(), Engine(), PoolForwardPd(g));
}
#endif

struct PoolPrimitive {
  dnnl::primitive primitive;
  memory::desc workspace_md;
  memory::desc scratchpad_md;
};

std::shared_ptr<const PoolPrimitive> CachedPool(const PoolGeometry& g, bool backward) {
  return FromCache<PoolPrimitive>(g.Key(backward), [&] {
    auto p = std::make_shared<PoolPrimitive>();
    auto fill = [&p](auto primitive, const auto& pd) {
      p->primitive = primitive;
      p->workspace_md = pd.workspace_desc();
      p->scratchpad_md = pd.scratchpad_desc();
    };
    if (backward) {
      auto pd = PoolBackwardPd(g);
      fill(dnnl::pooling_backward(pd), pd);
    } else {
      auto pd = PoolForwardPd(g);
      fill(dnnl::pooling_forward(pd), pd);
    }
    return p;
  });
}

// x [n, h, w, c] and y [n, oh, ow, c] of one float type; k, s, p sensible; the workspace large enough.
ffi::Error CheckPool(const Buffer& x, const Buffer& y, int64_t ws_bytes, int64_t k, int64_t s,
                     int64_t p, PoolGeometry* g) {
  auto xd = x.dimensions(), yd = y.dimensions();
  if (xd.size() != 4 || yd.size() != 4) return ffi::Error::InvalidArgument("x must be NHWC");
  Dt act, out;
  if (!ToDnnl(x.element_type(), &act) || !ToDnnl(y.element_type(), &out) || act != out) {
    return ffi::Error::InvalidArgument("x and y must both be float32 or both bfloat16");
  }
  if (k < 1 || s < 1 || p < 0 || 2 * p > k) return ffi::Error::InvalidArgument("bad pooling window");
  *g = PoolGeometry::Of(xd[0], xd[1], xd[2], xd[3], k, s, p, act);
  if (yd[0] != g->n || yd[1] != g->oh || yd[2] != g->ow || yd[3] != g->c) {
    return ffi::Error::InvalidArgument("y has the wrong shape for this pooling");
  }
  if (ws_bytes < static_cast<int64_t>(CachedPool(*g, false)->workspace_md.get_size())) {
    return ffi::Error::InvalidArgument("the pooling workspace buffer is too small");
  }
  return ffi::Error::Success();
}

ffi::Error PoolForward(Buffer x, ffi::Result<Buffer> y, ffi::Result<ffi::Buffer<ffi::U8, 1>> ws,
                       int64_t k, int64_t s, int64_t p) {
  try {
    PoolGeometry g;
    if (auto e = CheckPool(x, *y, ws->dimensions()[0], k, s, p, &g); e.failure()) return e;
    auto prim = CachedPool(g, false);
    std::lock_guard<std::mutex> run_lock(RunMutex());
    dnnl::stream stream(Engine());
    memory scratch(prim->scratchpad_md, Engine());
    prim->primitive.execute(
        stream, {{DNNL_ARG_SRC, memory(g.src_md(), Engine(), x.untyped_data())},
                 {DNNL_ARG_DST, memory(g.dst_md(), Engine(), y->untyped_data())},
                 {DNNL_ARG_WORKSPACE, memory(prim->workspace_md, Engine(), ws->typed_data())},
                 {DNNL_ARG_SCRATCHPAD, scratch}});
    stream.wait();
  } catch (const std::exception& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("jaxft oneDNN pooling: ") + e.what());
  }
  return ffi::Error::Success();
}

// dx has x's shape, so it gives the geometry.
ffi::Error PoolBackward(Buffer dy, ffi::Buffer<ffi::U8, 1> ws, ffi::Result<Buffer> dx, int64_t k,
                        int64_t s, int64_t p) {
  try {
    PoolGeometry g;
    if (auto e = CheckPool(*dx, dy, ws.dimensions()[0], k, s, p, &g); e.failure()) return e;
    auto prim = CachedPool(g, true);
    std::lock_guard<std::mutex> run_lock(RunMutex());
    dnnl::stream stream(Engine());
    memory scratch(prim->scratchpad_md, Engine());
    prim->primitive.execute(
        stream, {{DNNL_ARG_DIFF_DST, memory(g.dst_md(), Engine(), dy.untyped_data())},
                 {DNNL_ARG_DIFF_SRC, memory(g.src_md(), Engine(), dx->untyped_data())},
                 {DNNL_ARG_WORKSPACE, memory(prim->workspace_md, Engine(), ws.typed_data())},
                 {DNNL_ARG_SCRATCHPAD, scratch}});
    stream.wait();
  } catch (const std::exception& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("jaxft oneDNN pooling: ") + e.what());
  }
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------------------
// c = op(a) op(b) (op: the matrix or its transpose, a stride, not a copy; row-major, float32
// accumulation): the GEMMs of jaxft's small-map and 1x1 convolution passes. oneDNN's bfloat16
// matmul runs ~1.4x faster than XLA:CPU's bfloat16 dot here, and for a 1x1 convolution's kernel
// gradient (c = x^T dy over batch x pixels) several times faster than oneDNN's own convolution
// backward-weights kernel (docs/benchmarks.md, "bfloat16").

struct GemmGeometry {
  int64_t m, k, n;
  bool ta, tb;  // a is stored [K, M] / b is stored [N, K]
  Dt in, out;
  memory::desc a_md() const {
    return memory::desc({m, k}, in, ta ? memory::dims{1, m} : memory::dims{k, 1});
  }
  memory::desc b_md() const {
    return memory::desc({k, n}, in, tb ? memory::dims{1, k} : memory::dims{n, 1});
  }
  memory::desc c_md() const { return memory::desc({m, n}, out, memory::dims{n, 1}); }
  std::string Key() const {
    std::string key = "gemm";
    for (int64_t v : {m, k, n, static_cast<int64_t>(ta), static_cast<int64_t>(tb),
                      static_cast<int64_t>(in), static_cast<int64_t>(out)}) {
      key += ',' + std::to_string(v);
    }
    return key;
  }
};

#if DNNL_VERSION_MAJOR >= 3
dnnl::matmul::primitive_desc GemmPd(const GemmGeometry& g) {
  return dnnl::matmul::primitive_desc(Engine(), g.a_md(), g.b_md(), g.c_md(), Attr());
}
#else
dnnl::matmul::primitive_desc GemmPd(const GemmGeometry& g) {
  dnnl::matmul::desc d(g.a_md(), g.b_md(), g.c_md());
  return dnnl::matmul::primitive_desc(d, Attr(), Engine());
}
#endif

struct GemmPrimitive {
  dnnl::primitive primitive;
  memory::desc scratchpad_md;
};

std::shared_ptr<const GemmPrimitive> CachedGemm(const GemmGeometry& g) {
  return FromCache<GemmPrimitive>(g.Key(), [&] {
    auto p = std::make_shared<GemmPrimitive>();
    auto pd = GemmPd(g);
    p->primitive = dnnl::matmul(pd);
    p->scratchpad_md = pd.scratchpad_desc();
    return std::shared_ptr<const GemmPrimitive>(p);
  });
}

ffi::Error Gemm(ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::Result<ffi::AnyBuffer> c, int64_t trans_a,
                int64_t trans_b) {
  auto ad = a.dimensions(), bd = b.dimensions(), cd = c->dimensions();
  if (ad.size() != 2 || bd.size() != 2 || cd.size() != 2) {
    return ffi::Error::InvalidArgument("matmul: a, b and c must be 2-D");
  }
  const int64_t m = trans_a ? ad[1] : ad[0], k = trans_a ? ad[0] : ad[1];
  const int64_t kb = trans_b ? bd[1] : bd[0], n = trans_b ? bd[0] : bd[1];
  if (k != kb || cd[0] != m || cd[1] != n || m < 1 || k < 1 || n < 1) {
    return ffi::Error::InvalidArgument("matmul: op(a) [M, K], op(b) [K, N] and c [M, N] do not match");
  }
  Dt ta, tb, tc;
  if (!ToDnnl(a.element_type(), &ta) || !ToDnnl(b.element_type(), &tb) ||
      !ToDnnl(c->element_type(), &tc) || ta != tb) {
    return ffi::Error::InvalidArgument("matmul: a and b must share a type (float32 or bfloat16)");
  }
  const GemmGeometry g{m, k, n, trans_a != 0, trans_b != 0, ta, tc};
  try {
    auto p = CachedGemm(g);
    std::lock_guard<std::mutex> run_lock(RunMutex());
    dnnl::stream stream(Engine());
    memory am(g.a_md(), Engine(), a.untyped_data()), bm(g.b_md(), Engine(), b.untyped_data());
    memory cm(g.c_md(), Engine(), c->untyped_data());
    memory scratch(p->scratchpad_md, Engine());
    p->primitive.execute(stream, {{DNNL_ARG_SRC, am}, {DNNL_ARG_WEIGHTS, bm}, {DNNL_ARG_DST, cm},
                                  {DNNL_ARG_SCRATCHPAD, scratch}});
    stream.wait();
  } catch (const std::exception& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("jaxft oneDNN matmul: ") + e.what());
  } catch (...) {
    return ffi::Error(ffi::ErrorCode::kInternal, "jaxft oneDNN matmul: unknown exception");
  }
  return ffi::Error::Success();
}

}  // namespace

#define JAXFT_CONV_BINDING                                                             \
  ffi::Ffi::Bind()                                                                     \
      .Arg<ffi::AnyBuffer>()                                                           \
      .Arg<ffi::AnyBuffer>()                                                           \
      .Ret<ffi::AnyBuffer>()                                                           \
      .Attr<ffi::Span<const int64_t>>("strides")                                       \
      .Attr<ffi::Span<const int64_t>>("padding")                                       \
      .Attr<int64_t>("groups")

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxft_onednn_conv_fwd, Forward, JAXFT_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxft_onednn_conv_bwd_data, BackwardData, JAXFT_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxft_onednn_conv_bwd_weights, BackwardWeights, JAXFT_CONV_BINDING);

// Aliases without commas: the binding is a macro argument.
using jaxft_f32_vec = ffi::Buffer<ffi::F32, 1>;
using jaxft_u8_vec = ffi::Buffer<ffi::U8, 1>;

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxft_onednn_conv_bias, ConvBias,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<jaxft_f32_vec>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<ffi::Span<const int64_t>>("strides")
                                  .Attr<ffi::Span<const int64_t>>("padding")
                                  .Attr<int64_t>("groups")
                                  .Attr<int64_t>("act"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxft_onednn_conv_bias_add, ConvBiasAdd,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<jaxft_f32_vec>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<ffi::Span<const int64_t>>("strides")
                                  .Attr<ffi::Span<const int64_t>>("padding")
                                  .Attr<int64_t>("groups")
                                  .Attr<int64_t>("act"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxft_onednn_matmul, Gemm,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("trans_a")
                                  .Attr<int64_t>("trans_b"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxft_onednn_pool_fwd, PoolForward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<jaxft_u8_vec>()
                                  .Attr<int64_t>("k")
                                  .Attr<int64_t>("s")
                                  .Attr<int64_t>("p"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxft_onednn_pool_bwd, PoolBackward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<jaxft_u8_vec>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("k")
                                  .Attr<int64_t>("s")
                                  .Attr<int64_t>("p"));

// The bytes of the argmax workspace jaxft_onednn_pool_fwd writes for an [n, h, w, c] input (dtype 0:
// float32, 1: bfloat16) and a k x k / s window padded by p, or -1 when oneDNN cannot build it.
extern "C" int64_t jaxft_onednn_pool_workspace_bytes(int64_t n, int64_t h, int64_t w, int64_t c,
                                                     int64_t bf16, int64_t k, int64_t s, int64_t p) {
  try {
    const PoolGeometry g = PoolGeometry::Of(n, h, w, c, k, s, p, bf16 ? Dt::bf16 : Dt::f32);
    return static_cast<int64_t>(CachedPool(g, false)->workspace_md.get_size());
  } catch (...) {
    return -1;
  }
}

extern "C" int jaxft_onednn_version() {
  const dnnl_version_t* v = dnnl_version();
  return v->major * 10000 + v->minor * 100 + v->patch;
}
