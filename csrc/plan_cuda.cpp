// Planning of the CUDA backends: the backend's support for the shape, the
// path (pass + GEMM, im2col, packed taps, the fused 1x1 kernels) and the
// kernel configuration, from the device's properties and the tuning switches.
// The measurements behind each rule are in docs/notes/.
#include <ATen/cuda/CUDAContext.h>

#include <climits>

#include "cuda_glue.h"
#include "kernels/quantize_kernels.h"
#include "plan.h"

namespace q4conv {

static_assert(kSm80Channels == kSm80ChannelAlign && kSm90Channels == kSm90ChannelAlign,
              "plan.h's channel multiples must match the kernels'");

namespace {

bool fits_int(int64_t value) { return value >= 0 && value <= INT_MAX; }

ConvShape make_shape(int64_t n, int64_t h, int64_t w, int64_t c, int64_t k, int64_t r, int64_t s,
                     int64_t p, int64_t q, const ConvParams& params) {
  ConvShape shape;
  shape.n = static_cast<int>(n);
  shape.h = static_cast<int>(h);
  shape.w = static_cast<int>(w);
  shape.c = static_cast<int>(c);
  shape.k = static_cast<int>(k);
  shape.r = static_cast<int>(r);
  shape.s = static_cast<int>(s);
  shape.p = static_cast<int>(p);
  shape.q = static_cast<int>(q);
  shape.pad_h = static_cast<int>(params.padding[0]);
  shape.pad_w = static_cast<int>(params.padding[1]);
  shape.stride_h = static_cast<int>(params.stride[0]);
  shape.stride_w = static_cast<int>(params.stride[1]);
  shape.dil_h = static_cast<int>(params.dilation[0]);
  shape.dil_w = static_cast<int>(params.dilation[1]);
  return shape;
}

// The 1x1 GEMM over the im2col rows of `conv` (whose c is the real C).
ConvShape im2col_gemm_shape(const ConvShape& conv, int64_t cols) {
  ConvShape gemm;
  gemm.n = conv.n;
  gemm.h = gemm.p = conv.p;
  gemm.w = gemm.q = conv.q;
  gemm.c = static_cast<int>(cols);
  gemm.k = conv.k;
  gemm.r = gemm.s = 1;
  return gemm;
}

// The geometry a backend's kernels would run and its path before the fused
// 1x1 choice; false when the kernels' int geometry cannot hold the shape.
bool plan_geometry(ConvPlan& plan, const at::Tensor& x, int64_t out_channels, int64_t r, int64_t s,
                   const ConvParams& params, const Tuning& tuning, OutType out) {
  const ConvParams kp = kernel_params(plan, params);
  const int64_t n = x.size(0), channels = x.size(1);
  const int64_t h = plan.stride_grid ? (x.size(2) - 1) / params.stride[0] + 1 : x.size(2);
  const int64_t w = plan.stride_grid ? (x.size(3) - 1) / params.stride[1] + 1 : x.size(3);
  for (const int64_t v : {n, h, w, out_channels, r, s, plan.out_h, plan.out_w, kp.padding[0],
                          kp.padding[1], kp.stride[0], kp.stride[1], kp.dilation[0], kp.dilation[1],
                          channels + kSm80Channels, channels * r * s + 16})
    if (!fits_int(v)) return false;
  const KernelWeightLayout layout =
      kernel_weight_layout(plan.backend, out_channels, channels, r, s);
  if (plan.codes_in) {
    // The kernels read the codes as they are: NHWC int8 without padded
    // channels, 16-byte aligned for TMA (codes from q4conv always are).
    const int64_t c_stored = layout.packed_int4 ? layout.sizes[3] * 2 : layout.sizes[3];
    if (layout.im2col_rows || layout.packed_int4 || c_stored != channels ||
        !x.is_contiguous(at::MemoryFormat::ChannelsLast) ||
        (reinterpret_cast<uintptr_t>(x.data_ptr()) & 15) != 0)
      return false;
  }
  if (layout.im2col_rows) {
    plan.c_pad = channels;
    plan.conv = make_shape(n, h, w, channels, out_channels, r, s, plan.out_h, plan.out_w, kp);
#ifdef Q4CONV_HAVE_SM90
    const TapPacking taps = tap_packing(plan.conv);
    const ConvShape packed = packed_taps_shape(plan.conv, taps);
    if (tuning.packed_taps != Switch::kNever && taps.cols <= kMaxPackedChannels &&
        pack_taps_fits(plan.conv, taps) && sm90_int8_supports(packed, out)) {
      plan.path = Path::kPackedTaps;
      plan.shape = packed;
      return true;
    }
#endif
    plan.path = Path::kIm2col;
    plan.shape = im2col_gemm_shape(plan.conv, layout.sizes[3]);
    return im2col_rows_per_block(plan.shape.c) > 0;
  }
  plan.c_pad = layout.packed_int4 ? layout.sizes[3] * 2 : layout.sizes[3];
  plan.path = Path::kPassGemm;
  plan.conv = plan.shape =
      make_shape(n, h, w, plan.c_pad, out_channels, r, s, plan.out_h, plan.out_w, kp);
  return true;
}

bool backend_supports(const ConvPlan& plan, int major, OutType out) {
  switch (plan.backend) {
    case Backend::kSm90Int8:
#ifdef Q4CONV_HAVE_SM90
      return major == 9 && sm90_int8_supports_out_type(out) && sm90_int8_supports(plan.shape, out);
#else
      return false;
#endif
    case Backend::kSm80Int4:
#ifdef Q4CONV_HAVE_SM80
      return major >= 8 && sm80_int4_supports_out_type(out) && sm80_int4_supports(plan.shape, out);
#else
      return false;
#endif
    default:
      return false;
  }
}

#ifdef Q4CONV_HAVE_SM90
// What both fused 1x1 kernels read: a dense channels_last x, 16-byte
// aligned, of a 1x1 stride-1 convolution without padded channels.
bool dense_pointwise_input(const ConvPlan& plan, const at::Tensor& x) {
  return plan.path == Path::kPassGemm && !plan.stride_grid && is_pointwise_gemm(plan.shape) &&
         plan.shape.c == x.size(1) && x.is_contiguous(at::MemoryFormat::ChannelsLast) &&
         (reinterpret_cast<uintptr_t>(x.data_ptr()) & 15) == 0;
}

// The TMA + wgmma kernel (pointwise_wgmma.cu) by rule where K is one 256-wide
// slice (each input value quantized once), C >= 512 and the 64-pixel row
// blocks fill a wave of the device's SMs; two slices, or less than a wave,
// tie or lose to the default paths (docs/notes/).
bool use_wgmma_pointwise(const ConvPlan& plan, const at::Tensor& x, const Tuning& tuning) {
  if (tuning.wgmma_pointwise == Switch::kNever || !dense_pointwise_input(plan, x) ||
      !pointwise_wgmma_supports_out_type(out_type(x.scalar_type())))
    return false;
  const ConvShape& shape = plan.shape;
  const int64_t pixels = int64_t(shape.n) * shape.h * shape.w;
  if (!pointwise_wgmma_supports(kernel_in_type(x.scalar_type(), "x"), pixels, shape.c, shape.k))
    return false;
  constexpr int64_t kRowBlock = 64;  // pixels per CTA
  return tuning.wgmma_pointwise == Switch::kAlways ||
         (shape.k == 256 && shape.c >= 512 && pixels >= plan.sm_count * kRowBlock);
}

// The mma.sync kernel (pointwise_fused.cu) by rule where one block holds all
// of K's weights in at most two passes over its codes, or a cluster of two
// slices; more passes only tie pass + GEMM and larger clusters lose
// (per-step latency; docs/notes/).
bool use_fused_pointwise(const ConvPlan& plan, const at::Tensor& x, const Tuning& tuning) {
  if (tuning.fused_pointwise == Switch::kNever || !dense_pointwise_input(plan, x) ||
      !pointwise_fused_supports_out_type(out_type(x.scalar_type())))
    return false;
  const ConvShape& shape = plan.shape;
  const InType x_type = kernel_in_type(x.scalar_type(), "x");
  if (!pointwise_fused_supports(x_type, int64_t(shape.n) * shape.h * shape.w, shape.c, shape.k))
    return false;
  if (tuning.fused_pointwise == Switch::kAlways) return true;
  const PointwiseFusedLayout layout = pointwise_fused_layout(x_type, shape.c, shape.k);
  return layout.cluster == 1 ? layout.passes <= 2 : layout.cluster == 2;
}
#endif

void choose_fused_path(ConvPlan& plan, const at::Tensor& x, const Tuning& tuning) {
#ifdef Q4CONV_HAVE_SM90
  // The fused 1x1 kernels quantize float x and write conv_packed's output.
  if (plan.backend != Backend::kSm90Int8 || plan.codes_in || is_fused_out_type(plan.out_type))
    return;
  if (use_wgmma_pointwise(plan, x, tuning)) {
    plan.path = Path::kFusedWgmma;
    plan.config = plan.shape.k % 256 == 0 ? "wgmma 64x256 tiles" : "wgmma 64x128 tiles";
  } else if (use_fused_pointwise(plan, x, tuning)) {
    const PointwiseFusedLayout layout =
        pointwise_fused_layout(kernel_in_type(x.scalar_type(), "x"), plan.shape.c, plan.shape.k);
    plan.path = Path::kFusedMma;
    plan.config = "mma.sync passes=" + std::to_string(layout.passes) +
                  " cluster=" + std::to_string(layout.cluster);
  }
#else
  (void)plan, (void)x, (void)tuning;
#endif
}

std::string kernel_config(const ConvPlan& plan, OutType out) {
#ifdef Q4CONV_HAVE_SM90
  if (plan.backend == Backend::kSm90Int8) return sm90_int8_config_name(plan.shape, out);
#endif
  (void)out;
  return plan.backend == Backend::kSm80Int4 ? "cutlass sm80 int4 implicit gemm" : "";
}

// Plans `backend` into `plan`; false (plan unchanged) where it cannot run.
bool try_backend(ConvPlan& plan, Backend backend, const at::Tensor& x, int64_t out_channels,
                 int64_t r, int64_t s, const ConvParams& params, const Tuning& tuning, int major,
                 std::optional<OutType> fused_out) {
  ConvPlan candidate = plan;
  candidate.backend = backend;
  const OutType out = fused_out ? *fused_out : out_type(x.scalar_type());
  candidate.out_type = out;
  if (!plan_geometry(candidate, x, out_channels, r, s, params, tuning, out) ||
      !backend_supports(candidate, major, out))
    return false;
  candidate.config = kernel_config(candidate, out);
  choose_fused_path(candidate, x, tuning);
  plan = std::move(candidate);
  return true;
}

}  // namespace

void plan_cuda(ConvPlan& plan, const at::Tensor& x, int64_t out_channels, int64_t r, int64_t s,
               const ConvParams& params, Backend requested, const Tuning& tuning,
               std::optional<OutType> fused_out) {
  const auto* props = at::cuda::getDeviceProperties(x.device().index());
  plan.sm_count = props->multiProcessorCount;
  const bool pointwise = r == 1 && s == 1 && params.padding[0] == 0 && params.padding[1] == 0;
  // Codes in are read where they lie (the kernels take the stride themselves).
  plan.stride_grid = pointwise && (params.stride[0] > 1 || params.stride[1] > 1) && !plan.codes_in;
  const auto run = [&](Backend backend) {
    return try_backend(plan, backend, x, out_channels, r, s, params, tuning, props->major,
                       fused_out);
  };
  if (requested != Backend::kAuto) {
    TORCH_CHECK(run(requested), "backend '", backend_name(requested),
                "' cannot run this convolution on this device (not built for it, compute "
                "capability too low, or unsupported shape/alignment)");
    return;
  }
  // sm_90: int8 tensor cores on 4-bit values (native int4 MMA is emulated
  // there). sm_80/86/89: the native int4 kernel, except for very few input
  // channels, which would be mostly zero padding in its 32-channel tiles
  // (the exact fallback is faster there). Anything else: the fallback.
  constexpr int64_t kMinInt4KernelChannels = 16;
  if (props->major == 9 && run(Backend::kSm90Int8)) return;
  if (props->major == 8 && x.size(1) >= kMinInt4KernelChannels && run(Backend::kSm80Int4)) return;
  plan.stride_grid = false;  // the fallback convolves x itself
}

std::string describe_cuda_geometry(const ConvPlan& plan) {
  const ConvShape& g = plan.shape;
  return "n" + std::to_string(g.n) + " h" + std::to_string(g.h) + " w" + std::to_string(g.w) +
         " c" + std::to_string(g.c) + " k" + std::to_string(g.k) + " r" + std::to_string(g.r) +
         " s" + std::to_string(g.s) + " p" + std::to_string(g.p) + " q" + std::to_string(g.q) +
         " stride" + std::to_string(g.stride_h) + "x" + std::to_string(g.stride_w) + " pad" +
         std::to_string(g.pad_h) + "x" + std::to_string(g.pad_w) + " dil" +
         std::to_string(g.dil_h) + "x" + std::to_string(g.dil_w);
}

void apply_kernel_tuning(const Tuning& tuning) { sm90_int8_force_config(tuning.sm90_config); }

std::vector<std::string> sm90_config_names() { return sm90_int8_config_names(); }

}  // namespace q4conv
