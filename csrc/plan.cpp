// Planning of a convolution (see plan.h): the backend choice, the plan cache,
// the backward's path and the kernel weight layout rule.
#include "plan.h"
#include "q4conv.h"

#include <map>
#include <mutex>
#include <vector>

namespace q4conv {

Backend parse_backend(const std::string& name) {
  if (name == "auto") return Backend::kAuto;
  if (name == "fallback") return Backend::kFallback;
  if (name == "sm80_int4") return Backend::kSm80Int4;
  if (name == "sm90_int8") return Backend::kSm90Int8;
  TORCH_CHECK(false, "backend must be one of 'auto', 'fallback', 'sm80_int4', 'sm90_int8', got '",
              name, "'");
}

const char* backend_name(Backend backend) {
  switch (backend) {
    case Backend::kAuto:
      return "auto";
    case Backend::kFallback:
      return "fallback";
    case Backend::kSm80Int4:
      return "sm80_int4";
    case Backend::kSm90Int8:
      return "sm90_int8";
  }
  return "unknown";
}

const char* path_name(Path path) {
  switch (path) {
    case Path::kFallback:
      return "fallback";
    case Path::kPassGemm:
      return "pass_gemm";
    case Path::kIm2col:
      return "im2col_gemm";
    case Path::kPackedTaps:
      return "packed_taps";
    case Path::kFusedMma:
      return "fused_mma";
    case Path::kFusedWgmma:
      return "fused_wgmma";
  }
  return "unknown";
}

namespace {

// Everything a plan depends on. x's data pointer enters only as its 16-byte
// alignment (the fused 1x1 kernels' vector loads need it).
using PlanKey = std::array<int64_t, 24>;

PlanKey plan_key(const at::Tensor& x, int64_t out_channels, int64_t r, int64_t s,
                 const ConvParams& params, Backend requested, uint64_t tuning_epoch,
                 std::optional<OutType> fused_out) {
  const bool aligned16 = (reinterpret_cast<uintptr_t>(x.data_ptr()) & 15) == 0;
  return {static_cast<int64_t>(x.device().type()),
          x.device().index(),
          static_cast<int64_t>(x.scalar_type()),
          x.size(0),
          x.size(1),
          x.size(2),
          x.size(3),
          x.stride(0),
          x.stride(1),
          x.stride(2),
          x.stride(3),
          aligned16,
          out_channels,
          r,
          s,
          params.stride[0],
          params.stride[1],
          params.padding[0],
          params.padding[1],
          params.dilation[0],
          params.dilation[1],
          static_cast<int64_t>(requested),
          static_cast<int64_t>(tuning_epoch),
          fused_out ? 1 + static_cast<int64_t>(*fused_out) : 0};
}

std::shared_ptr<const ConvPlan> make_plan(const at::Tensor& x, int64_t out_channels, int64_t r,
                                          int64_t s, const ConvParams& params, Backend requested,
                                          const Tuning& tuning, std::optional<OutType> fused_out) {
  auto plan = std::make_shared<ConvPlan>();
  plan->codes_in = x.scalar_type() == at::kChar;
  std::tie(plan->out_h, plan->out_w) = output_hw(x.size(2), x.size(3), r, s, params);
  plan->c_pad = x.size(1);
  if (requested == Backend::kFallback) return plan;
  if (!x.is_cuda()) {
    TORCH_CHECK(requested == Backend::kAuto, "backend '", backend_name(requested),
                "' needs a CUDA input, got x on ", x.device());
    return plan;
  }
  plan_cuda(*plan, x, out_channels, r, s, params, requested, tuning, fused_out);
  return plan;
}

}  // namespace

std::shared_ptr<const ConvPlan> plan_conv(const at::Tensor& x, int64_t out_channels, int64_t r,
                                          int64_t s, const ConvParams& params, Backend requested,
                                          std::optional<OutType> fused_out) {
  TORCH_CHECK(x.dim() == 4, "x must be 4-D (N, C, H, W), got ", x.dim(), "-D");
  if (!x.is_cuda()) return make_plan(x, out_channels, r, s, params, requested, Tuning{}, fused_out);
  const Tuning tuning = current_tuning();
  const PlanKey key = plan_key(x, out_channels, r, s, params, requested, tuning.epoch, fused_out);
  static std::mutex mutex;
  static std::map<PlanKey, std::shared_ptr<const ConvPlan>> plans;
  {
    std::lock_guard<std::mutex> lock(mutex);
    const auto found = plans.find(key);
    if (found != plans.end()) return found->second;
  }
  auto plan = make_plan(x, out_channels, r, s, params, requested, tuning, fused_out);
  std::lock_guard<std::mutex> lock(mutex);
  if (plans.size() >= 4096) plans.clear();  // bounded for shape-varying workloads
  plans.emplace(key, plan);
  return plan;
}

BackwardPlan plan_backward(const at::Tensor& x, at::IntArrayRef weight_sizes,
                           at::ScalarType weight_dtype, bool weight_on_cuda,
                           const ConvParams& params) {
  BackwardPlan plan;
  const int64_t weight_numel =
      weight_sizes[0] * weight_sizes[1] * weight_sizes[2] * weight_sizes[3];
  plan.cuda_kernels = x.is_cuda() && weight_on_cuda && x.numel() > 0 && weight_numel > 0 &&
                      is_float_activation(x.scalar_type()) && is_float_activation(weight_dtype);
  const bool strided = params.stride[0] > 1 || params.stride[1] > 1;
  const bool pointwise = weight_sizes[2] == 1 && weight_sizes[3] == 1 && params.padding[0] == 0 &&
                         params.padding[1] == 0;
  // The LSQ kernels read the grid with vector loads along channels.
  plan.stride_grid = plan.cuda_kernels && strided && pointwise && x.size(1) > 1 && x.stride(1) == 1;
  return plan;
}

std::string describe_plan(const ConvPlan& plan, const BackwardPlan& backward) {
  std::string text;
  const auto line = [&text](const std::string& key, const std::string& value) {
    text += key + "=" + value + "\n";
  };
  line("backend", backend_name(plan.backend));
  line("path", path_name(plan.path));
  line("config", plan.config);
  line("stride_grid", plan.stride_grid ? "1" : "0");
  line("out_hw", std::to_string(plan.out_h) + "," + std::to_string(plan.out_w));
  line("code_channels", std::to_string(plan.c_pad));
  line("sm_count", std::to_string(plan.sm_count));
  if (plan.backend != Backend::kFallback) line("kernel_shape", describe_cuda_geometry(plan));
  line("backward", backward.cuda_kernels ? "cuda_lsq" : "aten");
  line("backward_stride_grid", backward.stride_grid ? "1" : "0");
  line("tuning", describe_tuning());
  return text;
}

ConvParams kernel_params(const ConvPlan& plan, const ConvParams& params) {
  ConvParams out = params;
  if (!plan.stride_grid) return out;
  for (int i = 0; i < 2; ++i) out.stride[i] = out.dilation[i] = 1;
  return out;
}

at::Tensor stride_grid_view(const at::Tensor& t, const int64_t (&stride)[2]) {
  const std::vector<int64_t> sizes{t.size(0), t.size(1), (t.size(2) - 1) / stride[0] + 1,
                                   (t.size(3) - 1) / stride[1] + 1};
  const std::vector<int64_t> strides{t.stride(0), t.stride(1), t.stride(2) * stride[0],
                                     t.stride(3) * stride[1]};
  return t.as_strided(sizes, strides, t.storage_offset());
}

KernelWeightLayout kernel_weight_layout(Backend backend, int64_t out_channels, int64_t channels,
                                        int64_t r, int64_t s) {
  TORCH_CHECK(backend == Backend::kSm80Int4 || backend == Backend::kSm90Int8,
              "backend must be 'sm80_int4' or 'sm90_int8' for a kernel weight layout, got '",
              backend_name(backend), "'");
  KernelWeightLayout layout;
  if (backend == Backend::kSm80Int4) {
    layout.packed_int4 = true;
    layout.sizes = {out_channels, r, s, round_up(channels, kSm80Channels) / 2};
  } else if (channels < kSm90Channels) {
    layout.im2col_rows = true;
    layout.sizes = {out_channels, 1, 1, round_up(channels * r * s, 16)};
  } else {
    layout.sizes = {out_channels, r, s, round_up(channels, kSm90Channels)};
  }
  return layout;
}

}  // namespace q4conv
