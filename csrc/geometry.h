// Convolution hyper-parameters as the ops receive them, and the output-size
// arithmetic every op and the planner share (overflow-checked: a stride,
// padding or dilation near 2^63 is an error naming it, not a wrapped size).
#pragma once

#include <ATen/ATen.h>

#include <utility>

namespace q4conv {

struct ConvParams {
  int64_t stride[2] = {1, 1};
  int64_t padding[2] = {0, 0};
  int64_t dilation[2] = {1, 1};
  double eps = 1e-5;
  int64_t bits = 4;
  bool relu = false;
};

// value rounded up to a multiple of `multiple` (channel padding, layouts).
inline int64_t round_up(int64_t value, int64_t multiple) {
  return (value + multiple - 1) / multiple * multiple;
}

// eps (the smallest scale: s = max(scale, eps)) must be finite and > 0;
// name is the argument's.
void check_eps(double eps, const char* name = "eps");

ConvParams make_params(at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                       double eps, int64_t bits, bool relu);

// Output height and width; TORCH_CHECKs that the (dilated) kernel fits the
// padded input and that no intermediate overflows int64.
std::pair<int64_t, int64_t> output_hw(int64_t h, int64_t w, int64_t r, int64_t s,
                                      const ConvParams& params);

}  // namespace q4conv
