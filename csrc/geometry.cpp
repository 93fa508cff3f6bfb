#include "geometry.h"

#include <cmath>

namespace q4conv {
namespace {

// a * b + c, or an error naming `what` when it does not fit int64.
int64_t checked_mul_add(int64_t a, int64_t b, int64_t c, const char* what) {
  int64_t product = 0, sum = 0;
  TORCH_CHECK(!__builtin_mul_overflow(a, b, &product) && !__builtin_add_overflow(product, c, &sum),
              what, " overflows int64 (", a, " * ", b, " + ", c, ")");
  return sum;
}

}  // namespace

void check_eps(double eps, const char* name) {
  TORCH_CHECK(std::isfinite(eps) && eps > 0, name, " must be finite and > 0, got ", eps);
}

ConvParams make_params(at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                       double eps, int64_t bits, bool relu) {
  TORCH_CHECK(stride.size() == 2, "stride must have 2 values, got ", stride.size());
  TORCH_CHECK(padding.size() == 2, "padding must have 2 values, got ", padding.size());
  TORCH_CHECK(dilation.size() == 2, "dilation must have 2 values, got ", dilation.size());
  ConvParams params;
  for (int i = 0; i < 2; ++i) {
    TORCH_CHECK(stride[i] >= 1, "stride must be >= 1, got ", stride);
    TORCH_CHECK(padding[i] >= 0, "padding must be >= 0, got ", padding);
    TORCH_CHECK(dilation[i] >= 1, "dilation must be >= 1, got ", dilation);
    params.stride[i] = stride[i];
    params.padding[i] = padding[i];
    params.dilation[i] = dilation[i];
  }
  check_eps(eps);
  params.eps = eps;
  params.bits = bits;
  params.relu = relu;
  return params;
}

std::pair<int64_t, int64_t> output_hw(int64_t h, int64_t w, int64_t r, int64_t s,
                                      const ConvParams& params) {
  TORCH_CHECK(r >= 1 && s >= 1, "kernel size must be >= 1, got (", r, ", ", s, ")");
  const int64_t extent_h =
      checked_mul_add(params.dilation[0], r - 1, 1, "dilation[0] * (kernel_size[0] - 1) + 1");
  const int64_t extent_w =
      checked_mul_add(params.dilation[1], s - 1, 1, "dilation[1] * (kernel_size[1] - 1) + 1");
  const int64_t padded_h = checked_mul_add(2, params.padding[0], h, "H + 2 * padding[0]");
  const int64_t padded_w = checked_mul_add(2, params.padding[1], w, "W + 2 * padding[1]");
  TORCH_CHECK(extent_h <= padded_h && extent_w <= padded_w, "kernel size (", extent_h, ", ",
              extent_w, ") after dilation is larger than the padded input (", padded_h, ", ",
              padded_w, ")");
  return {(padded_h - extent_h) / params.stride[0] + 1,
          (padded_w - extent_w) / params.stride[1] + 1};
}

}  // namespace q4conv
