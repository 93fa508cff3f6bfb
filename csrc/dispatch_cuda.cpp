// CUDA glue: turns tensors into the raw views the torch-free kernels take,
// allocates outputs and workspaces on PyTorch's allocator, launches on the
// current stream, and turns kernel failures into Python exceptions.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <array>
#include <cstdlib>
#include <string>

#include "cuda_views.h"
#include "kernels/conv_kernels.h"
#include "kernels/quantize_kernels.h"
#include "q4conv.h"

namespace q4conv {
namespace {

OutType out_type(at::ScalarType dtype) {
  switch (kernel_in_type(dtype, "x")) {
    case InType::kFloat32:
      return OutType::kFloat32;
    case InType::kFloat16:
      return OutType::kFloat16;
    case InType::kBFloat16:
      return OutType::kBFloat16;
  }
  return OutType::kFloat32;
}

void check_status(const KernelStatus& status, const char* what) {
  TORCH_CHECK(status.ok, "q4conv: ", what, " failed: ", status.message);
}

int64_t round_up(int64_t value, int64_t multiple) {
  return (value + multiple - 1) / multiple * multiple;
}

int64_t channel_align(Backend backend) {
  return backend == Backend::kSm80Int4 ? kSm80ChannelAlign : kSm90ChannelAlign;
}

ConvShape make_shape(const at::Tensor& x, int64_t k_out, int64_t r, int64_t s,
                     const ConvParams& params, int64_t c_pad) {
  const auto [p, q] = output_hw(x.size(2), x.size(3), r, s, params);
  ConvShape shape;
  shape.n = static_cast<int>(x.size(0));
  shape.h = static_cast<int>(x.size(2));
  shape.w = static_cast<int>(x.size(3));
  shape.c = static_cast<int>(c_pad);
  shape.k = static_cast<int>(k_out);
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

// What the kernels convolve: x itself, or for a 1x1 convolution with stride
// > 1 and no padding only the pixels it reads (a strided view: the
// quantization pass then touches 1/(stride_h * stride_w) of the input) with
// stride 1, which the sm90 backend runs as a persistent GEMM.
struct KernelInput {
  at::Tensor x;
  ConvParams params;
};

KernelInput kernel_input(const at::Tensor& x, int64_t r, int64_t s, const ConvParams& params) {
  const bool pointwise = r == 1 && s == 1 && params.padding[0] == 0 && params.padding[1] == 0;
  if (!pointwise || (params.stride[0] == 1 && params.stride[1] == 1)) return {x, params};
  KernelInput in{
      x.slice(2, 0, x.size(2), params.stride[0]).slice(3, 0, x.size(3), params.stride[1]), params};
  for (int i = 0; i < 2; ++i) {
    in.params.stride[i] = 1;
    in.params.dilation[i] = 1;
  }
  return in;
}

// Few input channels (the RGB stem): the sm90 backend convolves an im2col
// matrix of the codes, [N*P*Q, round_up(C*R*S, 16)], with its GEMM instead of
// padding C to 16 and loading one filter tap at a time.
bool uses_im2col(Backend backend, int64_t channels) {
  return backend == Backend::kSm90Int8 && channels < kSm90ChannelAlign;
}

int64_t im2col_cols(int64_t channels, int64_t r, int64_t s) {
  return round_up(channels * r * s, 16);
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

// What the backend's kernel runs for this convolution: its geometry (the
// GEMM's for im2col, the R' x 1 convolution's for packed filter taps), the
// convolution's own geometry on the stored codes (the same otherwise) and the
// stored channel count of the codes.
struct KernelGeometry {
  ConvShape shape;
  ConvShape conv;
  int64_t c_pad;
  bool packed_taps = false;
};

// Few channels: packed filter taps (conv_kernels.h TapPacking) where the
// sm90 kernels take that convolution (the packed rows are read R' times
// from L2 by the kernel instead of written and read as an im2col matrix:
// the stem's 128 MB of im2col rows become 53 MB), else the im2col GEMM.
// Q4CONV_PACKED_TAPS=0 always takes the im2col GEMM (A/B timing and tests).
bool packed_taps_enabled() {
  const char* env = std::getenv("Q4CONV_PACKED_TAPS");
  return env == nullptr || std::string(env) != "0";
}

KernelGeometry kernel_geometry(Backend backend, const KernelInput& in, int64_t out_channels,
                               int64_t r, int64_t s, OutType out) {
  const int64_t channels = in.x.size(1);
  if (uses_im2col(backend, channels)) {
    const ConvShape conv = make_shape(in.x, out_channels, r, s, in.params, channels);
#ifdef Q4CONV_HAVE_SM90
    const TapPacking taps = tap_packing(conv);
    const ConvShape packed = packed_taps_shape(conv, taps);
    if (packed_taps_enabled() && taps.cols <= kMaxPackedChannels && pack_taps_fits(conv, taps) &&
        sm90_int8_supports(packed, out))
      return {packed, conv, channels, true};
#endif
    (void)out;
    return {im2col_gemm_shape(conv, im2col_cols(channels, r, s)), conv, channels};
  }
  const int64_t c_pad = round_up(channels, channel_align(backend));
  const ConvShape conv = make_shape(in.x, out_channels, r, s, in.params, c_pad);
  return {conv, conv, c_pad};
}

#ifdef Q4CONV_HAVE_SM90  // pointwise_fused.cu is built with the sm90 kernels (sm_90a)
// Dense channels_last 1x1 stride-1 convolutions on sm90 can quantize inside
// an int8 mma.sync GEMM (pointwise_fused.cu: persistent blocks keep all of
// K's weights in shared memory, or one slice of them with the slices of K run
// as one cluster that reads and quantizes each input tile once; the codes
// never leave shared memory) instead of in a separate pass.
// Q4CONV_FUSED_POINTWISE=1 uses it wherever it can run, =0 never (A/B timing
// and tests).
enum class FusedMode { kRule, kAlways, kNever };

// A fused kernel's switch: unset = its measured rule, "0" = never, else
// wherever it can run.
FusedMode fused_mode(const char* switch_name) {
  const char* env = std::getenv(switch_name);
  if (env == nullptr) return FusedMode::kRule;
  return std::string(env) == "0" ? FusedMode::kNever : FusedMode::kAlways;
}

bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15) == 0; }

// What both fused 1x1 kernels read: a dense channels_last x, 16-byte aligned,
// of a 1x1 stride-1 convolution without padded channels, on the sm90 backend.
bool dense_pointwise_input(Backend backend, const at::Tensor& x, const ConvShape& shape) {
  return backend == Backend::kSm90Int8 && is_pointwise_gemm(shape) && shape.c == x.size(1) &&
         x.is_contiguous(at::MemoryFormat::ChannelsLast) && aligned16(x.data_ptr());
}

bool use_fused_pointwise(Backend backend, const at::Tensor& x, const ConvShape& shape) {
  const InType x_type = kernel_in_type(x.scalar_type(), "x");
  const bool runs =
      dense_pointwise_input(backend, x, shape) &&
      pointwise_fused_supports(x_type, int64_t(shape.n) * shape.h * shape.w, shape.c, shape.k);
  switch (fused_mode("Q4CONV_FUSED_POINTWISE")) {
    case FusedMode::kAlways:
      return runs;
    case FusedMode::kNever:
      return false;
    case FusedMode::kRule:
      break;
  }
  // H100, session 7, CUDA graphs, fused vs pass + GEMM in us. One block for
  // all of K with one slice or two passes: C64->K64 56x56 25.2 vs 35.2,
  // C256->K64 56x56 51.7 vs 87.0, C256->K128 56x56 61.2 vs 93.8, C512->K128
  // 28x28 31.9 vs 41.1, C64->K256 56x56 (two passes) 48.7 vs 63.3. Four
  // passes only tie (C128->K512 28x28 32.0 vs 32.2: three row blocks per
  // SM). Clusters of two win (C512->K256 28x28 45.7 vs 48.5); larger ones
  // lose (per-step latency, NOTES.md session 6: C1024->K256 14x14, four
  // slices, 48.3 vs 25.2).
  const PointwiseFusedLayout layout = pointwise_fused_layout(x_type, shape.c, shape.k);
  return runs && (layout.cluster == 1 ? layout.passes <= 2 : layout.cluster == 2);
}

// The same layers through TMA + int8 wgmma with the quantization in the
// CTA's warpgroups (pointwise_wgmma.cu). Q4CONV_WGMMA_POINTWISE=1 uses it
// wherever it can run, =0 never; the rule takes it where K is one 256-wide
// slice (each input value quantized once), C >= 512 and the 64-pixel row
// blocks fill a wave. H100, session 11, CUDA graphs, 5 rounds, us, wgmma vs
// the default before: C1024->K256 14x14 24.6 vs 27.9 (pass + GEMM),
// C512->K256 28x28 41.7 vs 46.3 (fused, cluster of two). Two 256-wide
// slices tie or lose (each slice re-reads and re-quantizes the input,
// against the default path measured in another run:
// C1024->K512 14x14 32.5 vs 32.2, C128->K512 28x28 39.7 vs 32.4), and so do
// layers with fewer row blocks than SMs' worth (C2048->K512 7x7: 98 CTAs,
// 24.2 vs 22.5).
bool use_wgmma_pointwise(Backend backend, const at::Tensor& x, const ConvShape& shape) {
  const FusedMode mode = fused_mode("Q4CONV_WGMMA_POINTWISE");
  if (mode == FusedMode::kNever || !dense_pointwise_input(backend, x, shape)) return false;
  const int64_t pixels = int64_t(shape.n) * shape.h * shape.w;
  if (!pointwise_wgmma_supports(kernel_in_type(x.scalar_type(), "x"), pixels, shape.c, shape.k))
    return false;
  constexpr int64_t kRowBlock = 64, kWave = 132;  // pixels per CTA; H100 SMs
  return mode == FusedMode::kAlways ||
         (shape.k == 256 && shape.c >= 512 && pixels >= kWave * kRowBlock);
}
#endif  // Q4CONV_HAVE_SM90

}  // namespace

namespace {

// Activation codes of x into `codes` (NHWC [N, H, W, c_pad] int8, or
// [N, H, W, c_pad / 2] packed int4), on the current stream. bias / scale are
// fp32 on x's device (scale: one value, read by the kernel, no host sync).
void quantize_activation_into(const at::Tensor& x, const at::Tensor& bias, const at::Tensor& scale,
                              double eps, int64_t bits, int64_t c_pad, bool packed_int4,
                              const at::Tensor& codes) {
  if (codes.numel() == 0) return;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const Tensor4dView view = kernel_view(x, "x");
  const int pad = static_cast<int>(c_pad), b = static_cast<int>(bits);
  const float e = static_cast<float>(eps);
  const KernelStatus status =
      packed_int4
          ? quantize_activation_int4_nhwc(view, bias.data_ptr<float>(), scale.data_ptr<float>(), e,
                                          b, pad, codes.data_ptr<uint8_t>(), stream)
          : quantize_activation_int8_nhwc(view, bias.data_ptr<float>(), scale.data_ptr<float>(), e,
                                          b, pad, codes.data_ptr<int8_t>(), stream);
  check_status(status, "activation quantization");
}

}  // namespace

at::Tensor cuda_quantize_activation(const at::Tensor& x, const at::Tensor& bias_a,
                                    const at::Tensor& scale_a, double eps, int64_t bits,
                                    int64_t c_pad, bool packed_int4) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t stored_c = packed_int4 ? c_pad / 2 : c_pad;
  at::Tensor codes = at::empty({x.size(0), x.size(2), x.size(3), stored_c},
                               x.options().dtype(packed_int4 ? at::kByte : at::kChar));
  quantize_activation_into(x, fp32_dense(bias_a), fp32_dense(scale_a), eps, bits, c_pad,
                           packed_int4, codes);
  return codes;
}

at::Tensor cuda_quantize_pack(const at::Tensor& weight, const at::Tensor& scale_w, double eps,
                              int64_t bits) {
  const c10::cuda::CUDAGuard guard(weight.device());
  const at::Tensor source = weight.scalar_type() == at::kDouble ? weight.to(at::kFloat) : weight;
  const at::Tensor scale = fp32_dense(scale_w);
  const int64_t c_pad = round_up(weight.size(1), 2);
  at::Tensor packed = at::empty({weight.size(0), weight.size(2), weight.size(3), c_pad / 2},
                                weight.options().dtype(at::kByte));
  if (packed.numel() == 0) return packed;
  check_status(
      quantize_pack_weight_int4(kernel_view(source.detach(), "weight"), scale.data_ptr<float>(),
                                scale.numel() > 1, static_cast<float>(eps), static_cast<int>(bits),
                                static_cast<int>(c_pad), packed.data_ptr<uint8_t>(),
                                at::cuda::getCurrentCUDAStream()),
      "weight quantization");
  return packed;
}

at::Tensor cuda_unpack_krsc(const at::Tensor& qweight, int64_t in_channels, int64_t c_pad,
                            bool packed_int4) {
  const c10::cuda::CUDAGuard guard(qweight.device());
  const at::Tensor source = qweight.contiguous();
  const int64_t rows = qweight.size(0) * qweight.size(1) * qweight.size(2);
  const int c_in = static_cast<int>(qweight.size(3) * 2);
  at::Tensor out = at::empty(
      {qweight.size(0), qweight.size(1), qweight.size(2), packed_int4 ? c_pad / 2 : c_pad},
      qweight.options().dtype(packed_int4 ? at::kByte : at::kChar));
  if (out.numel() == 0) return out;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int channels = static_cast<int>(in_channels), pad = static_cast<int>(c_pad);
  const KernelStatus status =
      packed_int4 ? repack_int4(source.data_ptr<uint8_t>(), rows, c_in, channels, pad,
                                out.data_ptr<uint8_t>(), stream)
                  : unpack_int4_to_int8(source.data_ptr<uint8_t>(), rows, c_in, channels, pad,
                                        out.data_ptr<int8_t>(), stream);
  check_status(status, "weight re-layout");
  return out;
}

bool cuda_backend_supports(Backend backend, const at::Tensor& x, int64_t out_channels, int64_t r,
                           int64_t s, const ConvParams& params, at::ScalarType out_dtype) {
  const auto* props = at::cuda::getDeviceProperties(x.device().index());
  const KernelInput in = kernel_input(x, r, s, params);
  const KernelGeometry geometry =
      kernel_geometry(backend, in, out_channels, r, s, out_type(out_dtype));
  const ConvShape& shape = geometry.shape;
  if (uses_im2col(backend, x.size(1)) && !geometry.packed_taps &&
      im2col_rows_per_block(shape.c) == 0)
    return false;
  switch (backend) {
    case Backend::kSm90Int8:
#ifdef Q4CONV_HAVE_SM90
      return props->major == 9 && sm90_int8_supports(shape, out_type(out_dtype));
#else
      return false;
#endif
    case Backend::kSm80Int4:
#ifdef Q4CONV_HAVE_SM80
      return props->major >= 8 && sm80_int4_supports(shape, out_type(out_dtype));
#else
      return false;
#endif
    default:
      return false;
  }
}

namespace {

// int8 KRSC codes [K, R, S, C] as the im2col GEMM reads them: int8
// [K, 1, 1, cols], row k = the (r, s, c)-ordered codes of filter k,
// zero-padded to cols.
at::Tensor im2col_rows(const at::Tensor& krsc) {
  const int64_t k_out = krsc.size(0), row = krsc.size(1) * krsc.size(2) * krsc.size(3);
  const int64_t cols = im2col_cols(krsc.size(3), krsc.size(1), krsc.size(2));
  return at::constant_pad_nd(krsc.reshape({k_out, row}), {0, cols - row})
      .reshape({k_out, 1, 1, cols})
      .contiguous();
}

at::Tensor im2col_weight(const at::Tensor& qweight, int64_t in_channels) {
  return im2col_rows(cuda_unpack_krsc(qweight, in_channels, in_channels, false));
}

// The im2col weight rows [K, 1, 1, cols] (what kernel_weight caches) as the
// packed-taps convolution reads them: [K, taps, 1, cols], channel i * slot +
// s * C + c of tap t holding filter row t * group + i (zero past R and in
// each slot's tail). Made per call (a copy of K*R*S*C bytes): the layout the
// layer caches does not depend on x, whose geometry picks the path.
at::Tensor packed_taps_weight(const at::Tensor& im2col_rows, const ConvShape& conv) {
  const TapPacking t = tap_packing(conv);
  const int64_t k_out = im2col_rows.size(0), row = int64_t(conv.s) * conv.c;
  const at::Tensor filter_rows =
      im2col_rows.reshape({k_out, -1}).narrow(1, 0, conv.r * row).reshape({k_out, conv.r, row});
  const int64_t padded_rows = int64_t(t.taps) * t.group;
  return at::constant_pad_nd(filter_rows, {0, t.slot - row, 0, padded_rows - conv.r})
      .reshape({k_out, t.taps, 1, t.cols})
      .contiguous();
}

}  // namespace

at::Tensor cuda_kernel_weight(const at::Tensor& qweight, int64_t in_channels, Backend backend) {
  TORCH_CHECK(backend == Backend::kSm80Int4 || backend == Backend::kSm90Int8,
              "kernel_weight: backend must be 'sm80_int4' or 'sm90_int8', got '",
              backend_name(backend), "'");
  if (uses_im2col(backend, in_channels)) return im2col_weight(qweight, in_channels);
  return cuda_unpack_krsc(qweight, in_channels, round_up(in_channels, channel_align(backend)),
                          backend == Backend::kSm80Int4);
}

namespace {

// Sizes of the weights in `backend`'s layout (what cuda_kernel_weight and
// cuda_train_kernel_weight return) for a (K, C, R, S) convolution.
std::array<int64_t, 4> kernel_weight_sizes(int64_t k_out, int64_t channels, int64_t r, int64_t s,
                                           Backend backend) {
  if (uses_im2col(backend, channels)) return {k_out, 1, 1, im2col_cols(channels, r, s)};
  const int64_t c_pad = round_up(channels, channel_align(backend));
  return {k_out, r, s, backend == Backend::kSm80Int4 ? c_pad / 2 : c_pad};
}

// True when `cached` has exactly the layout `backend` reads for qweight.
bool matches_layout(const at::Tensor& cached, const at::Tensor& qweight, int64_t in_channels,
                    Backend backend) {
  const bool packed = backend == Backend::kSm80Int4;
  const std::array<int64_t, 4> sizes =
      kernel_weight_sizes(qweight.size(0), in_channels, qweight.size(1), qweight.size(2), backend);
  return cached.defined() && cached.device() == qweight.device() && cached.dim() == 4 &&
         cached.is_contiguous() && cached.scalar_type() == (packed ? at::kByte : at::kChar) &&
         cached.sizes() == at::IntArrayRef(sizes);
}

}  // namespace

at::Tensor cuda_packed_kernel_weight(const at::Tensor& qweight,
                                     const std::optional<at::Tensor>& cached, int64_t in_channels,
                                     Backend backend) {
  if (cached.has_value() && matches_layout(*cached, qweight, in_channels, backend)) return *cached;
  return cuda_kernel_weight(qweight, in_channels, backend);
}

TrainKernelWeight cuda_train_kernel_weight(const at::Tensor& weight, const at::Tensor& scale_a,
                                           const at::Tensor& scale_w, double eps, int64_t bits,
                                           Backend backend) {
  TORCH_CHECK(backend == Backend::kSm80Int4 || backend == Backend::kSm90Int8,
              "cuda_train_kernel_weight: backend must be 'sm80_int4' or 'sm90_int8', got '",
              backend_name(backend), "'");
  const c10::cuda::CUDAGuard guard(weight.device());
  const at::Tensor source = weight.scalar_type() == at::kDouble ? weight.to(at::kFloat) : weight;
  const at::Tensor scale = fp32_dense(scale_w);
  const int64_t k_out = weight.size(0), channels = weight.size(1);
  const int64_t r = weight.size(2), s = weight.size(3);
  const bool per_channel = scale.numel() > 1;
  const float e = static_cast<float>(eps);
  const int b = static_cast<int>(bits);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const Tensor4dView view = kernel_view(source, "weight");
  TrainKernelWeight out;
  const bool quantizes = k_out * channels * r * s > 0;
  at::Tensor s_a;
  AlphaOut alpha;
  if (!quantizes) {
    out.alpha = cuda_output_alpha(scale_a, scale_w, k_out, eps);  // no launch to ride on
  } else {
    TORCH_CHECK(scale_a.device() == weight.device(), "scale_a must be on the weight's device (",
                weight.device(), "), got ", scale_a.device());
    out.alpha = at::empty({k_out}, weight.options().dtype(at::kFloat));
    s_a = fp32_dense(scale_a);
    alpha = {s_a.data_ptr<float>(), out.alpha.data_ptr<float>()};
  }
  if (backend == Backend::kSm80Int4) {
    out.weight = at::empty(kernel_weight_sizes(k_out, channels, r, s, backend),
                           weight.options().dtype(at::kByte));
    if (quantizes)
      check_status(quantize_pack_weight_int4(view, scale.data_ptr<float>(), per_channel, e, b,
                                             static_cast<int>(out.weight.size(3) * 2),
                                             out.weight.data_ptr<uint8_t>(), stream, alpha),
                   "weight quantization");
    return out;
  }
  // The im2col layout is made from unpadded KRSC codes.
  const bool im2col = uses_im2col(backend, channels);
  const std::array<int64_t, 4> sizes = im2col ? std::array<int64_t, 4>{k_out, r, s, channels}
                                              : kernel_weight_sizes(k_out, channels, r, s, backend);
  at::Tensor codes = at::empty(sizes, weight.options().dtype(at::kChar));
  if (quantizes)
    check_status(quantize_weight_int8_krsc(view, scale.data_ptr<float>(), per_channel, e, b,
                                           static_cast<int>(sizes[3]), codes.data_ptr<int8_t>(),
                                           stream, alpha),
                 "weight quantization");
  out.weight = im2col ? im2col_rows(codes) : codes;
  return out;
}

at::Tensor cuda_output_alpha(const at::Tensor& scale_a, const at::Tensor& scale_w,
                             int64_t out_channels, double eps) {
  const c10::cuda::CUDAGuard guard(scale_a.device());
  TORCH_CHECK(scale_w.device() == scale_a.device(), "scale_w must be on scale_a's device (",
              scale_a.device(), "), got ", scale_w.device());
  TORCH_CHECK(scale_w.numel() == 1 || scale_w.numel() == out_channels,
              "scale_w must hold 1 value or one per output channel (", out_channels, "), got ",
              scale_w.numel());
  const at::Tensor s_a = fp32_dense(scale_a);
  const at::Tensor s_w = fp32_dense(scale_w);
  at::Tensor alpha = at::empty({out_channels}, scale_a.options().dtype(at::kFloat));
  check_status(output_alpha_fp32(s_a.data_ptr<float>(), s_w.data_ptr<float>(), s_w.numel() > 1,
                                 static_cast<float>(eps), static_cast<int>(out_channels),
                                 alpha.data_ptr<float>(), at::cuda::getCurrentCUDAStream()),
               "output alpha");
  return alpha;
}

namespace {

int64_t workspace_bytes(Backend backend, const ConvShape& shape, OutType out_type) {
#ifdef Q4CONV_HAVE_SM90
  if (backend == Backend::kSm90Int8)
    return static_cast<int64_t>(sm90_int8_workspace_bytes(shape, out_type));
#endif
#ifdef Q4CONV_HAVE_SM80
  if (backend == Backend::kSm80Int4)
    return static_cast<int64_t>(sm80_int4_workspace_bytes(shape, out_type));
#endif
  return 0;
}

KernelStatus run_kernel(Backend backend, const ConvShape& shape, const void* act, const void* wgt,
                        const EpilogueArgs& epilogue, void* workspace, cudaStream_t stream) {
#ifdef Q4CONV_HAVE_SM90
  if (backend == Backend::kSm90Int8)
    return sm90_int8_conv(shape, act, wgt, epilogue, workspace, stream);
#endif
#ifdef Q4CONV_HAVE_SM80
  if (backend == Backend::kSm80Int4)
    return sm80_int4_conv(shape, act, wgt, epilogue, workspace, stream);
#endif
  return KernelStatus::failure("backend not built");
}

// The activation codes the backend's kernel reads: packed filter taps
// (quantized straight from x), or the quantization pass's NHWC codes and, for
// few channels without packed taps, their im2col rows.
at::Tensor kernel_activation(Backend backend, const KernelInput& in, const KernelGeometry& geometry,
                             const at::Tensor& bias_q, const at::Tensor& scale_q,
                             cudaStream_t stream) {
  const ConvShape& shape = geometry.shape;
  const ConvParams& params = in.params;
  if (geometry.packed_taps) {
    at::Tensor rows =
        at::empty({shape.n, shape.h, shape.w, shape.c}, in.x.options().dtype(at::kChar));
    check_status(pack_taps_quantize(kernel_view(in.x, "x"), bias_q.data_ptr<float>(),
                                    scale_q.data_ptr<float>(), static_cast<float>(params.eps),
                                    static_cast<int>(params.bits), geometry.conv,
                                    rows.data_ptr<int8_t>(), stream),
                 "packing filter taps");
    return rows;
  }
  const bool packed = backend == Backend::kSm80Int4;
  at::Tensor act = at::empty(
      {in.x.size(0), in.x.size(2), in.x.size(3), packed ? geometry.c_pad / 2 : geometry.c_pad},
      in.x.options().dtype(packed ? at::kByte : at::kChar));
  {
    Q4CONV_HOST_SPAN("q4conv::quantize_launch");
    quantize_activation_into(in.x, bias_q, scale_q, params.eps, params.bits, geometry.c_pad, packed,
                             act);
  }
  if (!uses_im2col(backend, in.x.size(1))) return act;
  at::Tensor rows = at::empty({int64_t(shape.n) * shape.p * shape.q, shape.c}, act.options());
  check_status(
      im2col_int8(geometry.conv, act.data_ptr<int8_t>(), shape.c, rows.data_ptr<int8_t>(), stream),
      "im2col");
  return rows;
}

// The kernels' NHWC result as the logical (N, K, P, Q) tensor: `out` itself
// (allocated channels_last, so no permute call), or for an x whose suggested
// format is NCHW an NCHW copy made by nhwc_to_nchw (ATen's strided copy of
// the stem's 103 MB fp16 output took 399 us on H100, three times the
// convolution).
at::Tensor layer_output(const at::Tensor& out, const at::Tensor& x, cudaStream_t stream) {
  if (x.suggest_memory_format() != at::MemoryFormat::Contiguous || out.is_contiguous()) return out;
  at::Tensor nchw = at::empty(out.sizes(), out.options());
  const int64_t pixels = out.size(2) * out.size(3);
  check_status(nhwc_to_nchw(out.data_ptr(), static_cast<int>(out.element_size()), out.size(0),
                            pixels, out.size(1), nchw.data_ptr(), stream),
               "NCHW output");
  return nchw;
}

}  // namespace

at::Tensor cuda_conv(Backend backend, const at::Tensor& x, const at::Tensor& bias_a,
                     const at::Tensor& scale_a, const at::Tensor& kernel_weight,
                     const std::array<int64_t, 3>& krs, const at::Tensor& alpha,
                     const std::optional<at::Tensor>& bias, const ConvParams& params) {
  const c10::cuda::CUDAGuard guard(x.device());
  const auto [k_out, r, s] = krs;
  const KernelInput in = kernel_input(x, r, s, params);
  const KernelGeometry geometry =
      kernel_geometry(backend, in, k_out, r, s, out_type(x.scalar_type()));
  const at::Tensor wgt =
      geometry.packed_taps ? packed_taps_weight(kernel_weight, geometry.conv) : kernel_weight;
  at::Tensor bias_f;
  if (bias.has_value() && bias->defined()) bias_f = fp32_dense(*bias);
  const ConvShape& shape = geometry.shape;
  // NHWC memory, (N, K, P, Q) sizes: what the kernels write, already the
  // layer's channels_last result.
  at::Tensor out = at::empty({shape.n, shape.k, shape.p, shape.q},
                             x.options().memory_format(at::MemoryFormat::ChannelsLast));

  EpilogueArgs epilogue;
  epilogue.alpha = alpha.data_ptr<float>();
  epilogue.bias = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  epilogue.relu = params.relu;
  epilogue.out_type = out_type(x.scalar_type());
  epilogue.out = out.data_ptr();

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor bias_q = fp32_dense(bias_a), scale_q = fp32_dense(scale_a);
#ifdef Q4CONV_HAVE_SM90
  // The fused 1x1 kernels (same arguments): quantization inside the GEMM.
  const auto fused = use_wgmma_pointwise(backend, in.x, shape)   ? &pointwise_wgmma_conv
                     : use_fused_pointwise(backend, in.x, shape) ? &pointwise_fused_conv
                                                                 : nullptr;
  if (fused != nullptr) {
    check_status(
        fused(in.x.data_ptr(), kernel_in_type(in.x.scalar_type(), "x"),
              int64_t(shape.n) * shape.h * shape.w, shape.c, bias_q.data_ptr<float>(),
              scale_q.data_ptr<float>(), static_cast<float>(params.eps),
              static_cast<int>(params.bits), wgt.data_ptr<int8_t>(), shape.k, epilogue, stream),
        fused == &pointwise_wgmma_conv ? "sm90_int8 wgmma pointwise convolution"
                                       : "sm90_int8 fused pointwise convolution");
    return layer_output(out, x, stream);
  }
#endif
  const at::Tensor act = kernel_activation(backend, in, geometry, bias_q, scale_q, stream);
  const int64_t workspace_size = workspace_bytes(backend, shape, epilogue.out_type);
  at::Tensor workspace;
  if (workspace_size > 0) workspace = at::empty({workspace_size}, x.options().dtype(at::kByte));
  {
    Q4CONV_HOST_SPAN("q4conv::conv_kernel_launch");
    check_status(run_kernel(backend, shape, act.data_ptr(), wgt.data_ptr(), epilogue,
                            workspace.defined() ? workspace.data_ptr() : nullptr, stream),
                 backend_name(backend));
  }
  return layer_output(out, x, stream);
}

}  // namespace q4conv
