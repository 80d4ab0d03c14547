// oneDNN convolutions for XLA:CPU, as XLA FFI custom calls (see jaxft/cpu/onednn.py).
//
// Three handlers, all float32, NHWC activations and HWIO kernels (jaxft's layouts; with G groups the
// kernel is [KH, KW, C/G, O] and output channel o belongs to group o / (O/G)), no dilation, explicit
// non-negative padding:
//   jaxft_onednn_conv_fwd          y  = conv(x, k)
//   jaxft_onednn_conv_bwd_data     dx = d conv / dx applied to dy
//   jaxft_onednn_conv_bwd_weights  dk = d conv / dk applied to dy
// oneDNN picks its own weights layout (usually blocked); the HWIO kernel is reordered into it (and the
// kernel gradient out of it) on every call, which costs little next to the convolution itself.
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

// One convolution's shapes: x [n, h, w, c], k [kh, kw, c / g, o], y [n, oh, ow, o]; g groups.
struct Geometry {
  int64_t n, h, w, c, kh, kw, o, oh, ow, sh, sw, pt, pb, pl, pr, g;

  memory::dims src() const { return {n, c, h, w}; }
  memory::dims wei() const {
    if (g == 1) return {o, c, kh, kw};
    return {g, o / g, c / g, kh, kw};
  }
  memory::dims dst() const { return {n, o, oh, ow}; }
  memory::dims strides() const { return {sh, sw}; }
  memory::dims pad_l() const { return {pt, pl}; }
  memory::dims pad_r() const { return {pb, pr}; }
  memory::desc src_md() const { return memory::desc(src(), Dt::f32, Tag::nhwc); }
  memory::desc dst_md() const { return memory::desc(dst(), Dt::f32, Tag::nhwc); }
  memory::desc user_wei_md() const {
    return memory::desc(wei(), Dt::f32, g == 1 ? Tag::hwio : Tag::hwigo);
  }
  memory::desc any_wei_md() const { return memory::desc(wei(), Dt::f32, Tag::any); }

  std::string Key(Pass pass) const {
    std::string key = std::to_string(static_cast<int>(pass));
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
      Engine(), dnnl::algorithm::convolution_direct, g.src_md(), g.any_wei_md(), g.dst_md(),
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
                                             g.any_wei_md(), g.dst_md(), g.strides(), g.pad_l(),
                                             g.pad_r());
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

std::shared_ptr<const Primitive> Cached(const Geometry& g, Pass pass) {
  static std::mutex* mu = new std::mutex;
  static auto* cache = new std::unordered_map<std::string, std::shared_ptr<const Primitive>>;
  const std::string key = g.Key(pass);
  {
    std::lock_guard<std::mutex> lock(*mu);
    auto it = cache->find(key);
    if (it != cache->end()) return it->second;
  }
  auto p = Build(g, pass);  // outside the lock: building can take milliseconds
  std::lock_guard<std::mutex> lock(*mu);
  return cache->emplace(key, p).first->second;
}

// x, k, y as in Dispatch.
ffi::Error Run(Pass pass, const Geometry& g, float* x, float* k, float* y) {
  try {
    auto p = Cached(g, pass);
    // One convolution at a time: each already spreads over every core (oneDNN's OpenMP team), and
    // XLA would otherwise start two independent ones at once (a layer's input and kernel gradients)
    // and oversubscribe the cores (measured gain: docs/benchmarks.md, fifth session).
    static std::mutex* run_mu = new std::mutex;
    std::lock_guard<std::mutex> run_lock(*run_mu);
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

using F32Buffer = ffi::Buffer<ffi::F32, 4>;

// x, k, y are the forward pass's operands, whichever of them this pass reads or writes.
ffi::Error Dispatch(Pass pass, const F32Buffer& x, const F32Buffer& k, const F32Buffer& y,
                    ffi::Span<const int64_t> strides, ffi::Span<const int64_t> padding,
                    int64_t groups) {
  auto xd = x.dimensions(), kd = k.dimensions(), yd = y.dimensions();
  if (auto e = Check(xd, kd, yd, strides, padding, groups); e.failure()) return e;
  const Geometry g{xd[0], xd[1], xd[2], xd[3], kd[0], kd[1], kd[3], yd[1], yd[2], strides[0],
                   strides[1], padding[0], padding[1], padding[2], padding[3], groups};
  return Run(pass, g, x.typed_data(), k.typed_data(), y.typed_data());
}

ffi::Error Forward(F32Buffer x, F32Buffer k, ffi::Result<F32Buffer> y,
                   ffi::Span<const int64_t> strides, ffi::Span<const int64_t> padding,
                   int64_t groups) {
  return Dispatch(kForward, x, k, *y, strides, padding, groups);
}

ffi::Error BackwardData(F32Buffer dy, F32Buffer k, ffi::Result<F32Buffer> dx,
                        ffi::Span<const int64_t> strides, ffi::Span<const int64_t> padding,
                        int64_t groups) {
  return Dispatch(kBackwardData, *dx, k, dy, strides, padding, groups);
}

ffi::Error BackwardWeights(F32Buffer x, F32Buffer dy, ffi::Result<F32Buffer> dk,
                           ffi::Span<const int64_t> strides, ffi::Span<const int64_t> padding,
                           int64_t groups) {
  return Dispatch(kBackwardWeights, x, *dk, dy, strides, padding, groups);
}

}  // namespace

#define JAXFT_CONV_BINDING                                                             \
  ffi::Ffi::Bind()                                                                     \
      .Arg<ffi::Buffer<ffi::F32, 4>>()                                                 \
      .Arg<ffi::Buffer<ffi::F32, 4>>()                                                 \
      .Ret<ffi::Buffer<ffi::F32, 4>>()                                                 \
      .Attr<ffi::Span<const int64_t>>("strides")                                       \
      .Attr<ffi::Span<const int64_t>>("padding")                                       \
      .Attr<int64_t>("groups")

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxft_onednn_conv_fwd, Forward, JAXFT_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxft_onednn_conv_bwd_data, BackwardData, JAXFT_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxft_onednn_conv_bwd_weights, BackwardWeights, JAXFT_CONV_BINDING);

extern "C" int jaxft_onednn_version() {
  const dnnl_version_t* v = dnnl_version();
  return v->major * 10000 + v->minor * 100 + v->patch;
}
