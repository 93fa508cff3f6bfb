// torch.ops.q4conv.max_pool_codes: a 2-D max-pool of int8 activation codes
// with torch.nn.functional.max_pool2d's semantics (deploy runs the max-pools
// between a layer writing codes and its readers on the codes: rounding is
// monotonic, so the max of codes is the code of the max). Here: the argument
// checks and output size both devices share, and the CPU kernel; the CUDA
// kernel is kernels/pool_codes_cuda.cu (glue: cuda_pool_codes.cpp).
#include <ATen/Parallel.h>
#include <ATen/native/Pool.h>

#include <algorithm>
#include <array>
#include <climits>

#include "q4conv.h"

namespace q4conv {
namespace {

using Pair = std::array<int64_t, 2>;

// A max_pool2d argument as (height, width): one value for both axes or two;
// an empty list is `empty_as` where given (stride: kernel_size), else an error.
Pair pair_of(at::IntArrayRef values, const char* name, const Pair* empty_as = nullptr) {
  if (values.empty() && empty_as != nullptr) return *empty_as;
  TORCH_CHECK(values.size() == 1 || values.size() == 2, name, " must be one int or two ints",
              empty_as != nullptr ? " (or empty: kernel_size)" : "", ", got ", values);
  return {values[0], values.back()};
}

// `value` of argument `name` is in [lowest, INT_MAX] (the kernels take int).
void check_range(const Pair& value, int64_t lowest, const char* name) {
  for (const int64_t v : value) {
    TORCH_CHECK(v >= lowest, name, " must be >= ", lowest, ", got (", value[0], ", ", value[1],
                ")");
    TORCH_CHECK(v <= INT_MAX, name, " must be at most ", INT_MAX, ", got (", value[0], ", ",
                value[1], ")");
  }
}

void check_codes(const at::Tensor& codes) {
  TORCH_CHECK(codes.defined(), "codes must be a tensor, got None");
  TORCH_CHECK(codes.scalar_type() == at::kChar, "codes must be int8 (activation codes), got ",
              codes.scalar_type());
  TORCH_CHECK(codes.dim() == 4, "codes must be 4-D (N, C, H, W), got ", codes.dim(),
              "-D with shape ", codes.sizes());
  TORCH_CHECK(codes.size(1) > 0 && codes.size(2) > 0 && codes.size(3) > 0,
              "codes must have C, H and W > 0 (only N may be 0), got shape ", codes.sizes());
}

// The pool over dense NHWC int8: one output row (n, y) at a time, in
// parallel; the channel loop innermost (contiguous, vectorized by the
// compiler). Padding positions are skipped, so they never win.
void max_pool_nhwc_cpu(const int8_t* in, int8_t* out, const at::IntArrayRef sizes,
                       const MaxPoolParams& p) {
  const int64_t n = sizes[0], c = sizes[1], h = sizes[2], w = sizes[3];
  const int64_t row_work = p.out_w * c * p.kernel[0] * p.kernel[1];
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, row_work));
  at::parallel_for(0, n * p.out_h, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int8_t* image = in + (row / p.out_h) * h * w * c;
      const int64_t y0 = (row % p.out_h) * p.stride[0] - p.padding[0];
      for (int64_t x = 0; x < p.out_w; ++x) {
        int8_t* dst = out + (row * p.out_w + x) * c;
        std::fill_n(dst, c, INT8_MIN);
        const int64_t x0 = x * p.stride[1] - p.padding[1];
        for (int64_t i = 0; i < p.kernel[0]; ++i) {
          const int64_t yy = y0 + i * p.dilation[0];
          if (yy < 0 || yy >= h) continue;
          for (int64_t j = 0; j < p.kernel[1]; ++j) {
            const int64_t xx = x0 + j * p.dilation[1];
            if (xx < 0 || xx >= w) continue;
            const int8_t* src = image + (yy * w + xx) * c;
            for (int64_t ch = 0; ch < c; ++ch) dst[ch] = std::max(dst[ch], src[ch]);
          }
        }
      }
    }
  });
}

}  // namespace

MaxPoolParams check_max_pool_codes(const at::Tensor& codes, at::IntArrayRef kernel_size,
                                   at::IntArrayRef stride, at::IntArrayRef padding,
                                   at::IntArrayRef dilation, bool ceil_mode) {
  check_codes(codes);
  const Pair kernel = pair_of(kernel_size, "kernel_size");
  const Pair step = pair_of(stride, "stride", &kernel);
  const Pair pad = pair_of(padding, "padding");
  const Pair dil = pair_of(dilation, "dilation");
  check_range(kernel, 1, "kernel_size");
  check_range(step, 1, "stride");
  check_range(pad, 0, "padding");
  check_range(dil, 1, "dilation");
  TORCH_CHECK(pad[0] <= kernel[0] / 2 && pad[1] <= kernel[1] / 2,
              "padding must be at most half of kernel_size (", kernel[0] / 2, ", ", kernel[1] / 2,
              ") as in max_pool2d, got padding (", pad[0], ", ", pad[1], ") for kernel_size (",
              kernel[0], ", ", kernel[1], ")");
  MaxPoolParams params;
  for (int a = 0; a < 2; ++a) {
    params.kernel[a] = kernel[a];
    params.stride[a] = step[a];
    params.padding[a] = pad[a];
    params.dilation[a] = dil[a];
  }
  params.ceil_mode = ceil_mode;
  const int64_t h = codes.size(2), w = codes.size(3);
  // max_pool2d's own output size (with ceil_mode the last window starts inside
  // the input or the left padding).
  params.out_h = at::native::pooling_output_shape_pad_lr<int64_t>(h, kernel[0], pad[0], pad[0],
                                                                  step[0], dil[0], ceil_mode);
  params.out_w = at::native::pooling_output_shape_pad_lr<int64_t>(w, kernel[1], pad[1], pad[1],
                                                                  step[1], dil[1], ceil_mode);
  TORCH_CHECK(params.out_h >= 1 && params.out_w >= 1, "codes of (H, W) = (", h, ", ", w,
              ") give an empty output (", params.out_h, ", ", params.out_w, "): the kernel_size (",
              kernel[0], ", ", kernel[1], ") after dilation (", dil[0], ", ", dil[1],
              ") must fit the input padded by padding (", pad[0], ", ", pad[1], ")");
  return params;
}

at::Tensor max_pool_codes_output(const at::Tensor& codes, const MaxPoolParams& params) {
  return at::empty({codes.size(0), codes.size(1), params.out_h, params.out_w},
                   codes.options().memory_format(codes.suggest_memory_format()));
}

at::Tensor nhwc_buffer(const at::Tensor& out) {
  return out.is_contiguous(at::MemoryFormat::ChannelsLast)
             ? out
             : at::empty_like(out, at::MemoryFormat::ChannelsLast);
}

at::Tensor cpu_max_pool_codes(const at::Tensor& codes, at::IntArrayRef kernel_size,
                              at::IntArrayRef stride, at::IntArrayRef padding,
                              at::IntArrayRef dilation, bool ceil_mode) {
  const MaxPoolParams params =
      check_max_pool_codes(codes, kernel_size, stride, padding, dilation, ceil_mode);
  at::Tensor out = max_pool_codes_output(codes, params);
  if (out.numel() == 0) return out;
  // Any memory format as dense NHWC (a channels_last input as it is).
  const at::Tensor in = codes.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor nhwc = nhwc_buffer(out);
  max_pool_nhwc_cpu(in.const_data_ptr<int8_t>(), nhwc.mutable_data_ptr<int8_t>(), in.sizes(),
                    params);
  if (!nhwc.is_same(out)) out.copy_(nhwc);
  return out;
}

}  // namespace q4conv
