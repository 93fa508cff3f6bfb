// Standalone check of the CUDA quantization kernels (csrc/kernels/quantize_cuda.cu)
// against host loops over csrc/quant.h. No torch. Built by
// tests/cuda/CMakeLists.txt.
//
// Prints "N passed, N failed" and exits non-zero on any failure. Pass --no-bench
// to skip the bandwidth measurements at the end.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "kernels/quantize_kernels.h"
#include "quant.h"

using namespace q4conv;

#define CUDA_CHECK(expr)                                                 \
  do {                                                                   \
    cudaError_t err_ = (expr);                                           \
    if (err_ != cudaSuccess) {                                           \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #expr, \
                   cudaGetErrorString(err_));                            \
      std::exit(2);                                                      \
    }                                                                    \
  } while (0)

static int g_passed = 0;
static int g_failed = 0;

static void record(bool ok, const std::string& name, const std::string& detail = "") {
  if (ok) {
    ++g_passed;
  } else {
    ++g_failed;
    std::printf("FAIL %s %s\n", name.c_str(), detail.c_str());
  }
}

static std::mt19937_64 g_rng(12345);
static double urand() { return std::uniform_real_distribution<double>(0.0, 1.0)(g_rng); }
static int irand(int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(g_rng); }

// ---- element types ------------------------------------------------------------
static size_t elem_size(InType t) { return t == InType::kFloat32 ? 4 : 2; }
static const char* type_name(InType t) {
  return t == InType::kFloat32 ? "fp32" : (t == InType::kFloat16 ? "fp16" : "bf16");
}
static void store_elem(InType t, void* base, int64_t i, float v) {
  switch (t) {
    case InType::kFloat32:
      static_cast<float*>(base)[i] = v;
      break;
    case InType::kFloat16:
      static_cast<__half*>(base)[i] = __float2half_rn(v);
      break;
    case InType::kBFloat16:
      static_cast<__nv_bfloat16*>(base)[i] = __float2bfloat16_rn(v);
      break;
  }
}
static float load_elem(InType t, const void* base, int64_t i) {
  switch (t) {
    case InType::kFloat32:
      return static_cast<const float*>(base)[i];
    case InType::kFloat16:
      return __half2float(static_cast<const __half*>(base)[i]);
    case InType::kBFloat16:
      return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[i]);
  }
  return 0.0f;
}

// ---- layouts ------------------------------------------------------------------
enum class Layout {
  kNCHW,          // contiguous
  kNCHWBatchPad,  // plane contiguous, padded batch stride, odd element offset
  kCL,            // channels_last contiguous
  kCLOffset,      // channels_last, data pointer one element past an aligned base
  kCLPadded,      // channels_last with pixel stride C + 5
  kStridedW,      // NCHW with every other W element (generic path)
  kPermuted       // memory order (C, N, W, H) (generic path)
};
static const char* layout_name(Layout l) {
  switch (l) {
    case Layout::kNCHW:
      return "nchw";
    case Layout::kNCHWBatchPad:
      return "nchw_batchpad";
    case Layout::kCL:
      return "channels_last";
    case Layout::kCLOffset:
      return "channels_last_offset";
    case Layout::kCLPadded:
      return "channels_last_padded";
    case Layout::kStridedW:
      return "strided_w";
    case Layout::kPermuted:
      return "permuted";
  }
  return "?";
}
static const Layout kAllLayouts[] = {Layout::kNCHW,     Layout::kNCHWBatchPad, Layout::kCL,
                                     Layout::kCLOffset, Layout::kCLPadded,     Layout::kStridedW,
                                     Layout::kPermuted};

// A host tensor laid out per `layout`, plus its device copy and view.
struct Tensor {
  InType type;
  int64_t size[4];
  int64_t stride[4];
  int64_t offset = 0;  // elements before element (0,0,0,0)
  int64_t alloc = 0;   // elements
  std::vector<unsigned char> host;
  void* dev = nullptr;
  Tensor4dView view() const {
    Tensor4dView v;
    v.data = static_cast<const unsigned char*>(dev) + offset * elem_size(type);
    v.type = type;
    for (int d = 0; d < 4; ++d) {
      v.size[d] = size[d];
      v.stride[d] = stride[d];
    }
    return v;
  }
  int64_t index(int64_t n, int64_t c, int64_t h, int64_t w) const {
    return offset + n * stride[0] + c * stride[1] + h * stride[2] + w * stride[3];
  }
  float at(int64_t n, int64_t c, int64_t h, int64_t w) const {
    return load_elem(type, host.data(), index(n, c, h, w));
  }
  ~Tensor() {
    if (dev) cudaFree(dev);
  }
};

static void make_strides(Layout l, const int64_t* s, int64_t* st, int64_t* offset) {
  const int64_t N = s[0], C = s[1], H = s[2], W = s[3];
  *offset = 0;
  switch (l) {
    case Layout::kNCHW:
      st[0] = C * H * W;
      st[1] = H * W;
      st[2] = W;
      st[3] = 1;
      break;
    case Layout::kNCHWBatchPad:
      st[0] = C * H * W + 7;
      st[1] = H * W;
      st[2] = W;
      st[3] = 1;
      *offset = 3;
      break;
    case Layout::kCL:
      st[0] = H * W * C;
      st[1] = 1;
      st[2] = W * C;
      st[3] = C;
      break;
    case Layout::kCLOffset:
      st[0] = H * W * C;
      st[1] = 1;
      st[2] = W * C;
      st[3] = C;
      *offset = 1;
      break;
    case Layout::kCLPadded: {
      const int64_t ps = C + 5;
      st[0] = H * W * ps;
      st[1] = 1;
      st[2] = W * ps;
      st[3] = ps;
      break;
    }
    case Layout::kStridedW:
      st[0] = C * H * 2 * W;
      st[1] = H * 2 * W;
      st[2] = 2 * W;
      st[3] = 2;
      break;
    case Layout::kPermuted:  // memory order C, N, W, H
      st[3] = H;
      st[2] = 1;
      st[0] = W * H;
      st[1] = N * W * H;
      break;
  }
}

// Value generator: specials, exact .5 ties (for scale = tie_scale and biases
// that are multiples of tie_scale / 2), values beyond the range, ordinary ones.
struct ValueGen {
  float scale;      // the effective scale the data is built for
  float tie_scale;  // > 0: ties k + 0.5 of this scale are exact
  int bits;
  float value(float bias) {
    const double u = urand();
    const float range = static_cast<float>(qmax(bits));
    if (u < 0.04) return std::numeric_limits<float>::quiet_NaN();
    if (u < 0.07) return std::numeric_limits<float>::infinity();
    if (u < 0.10) return -std::numeric_limits<float>::infinity();
    if (u < 0.30 && tie_scale > 0) {
      const int k = irand(-(1 << (bits - 1)) - 2, (1 << (bits - 1)) + 1);
      return (static_cast<float>(k) + 0.5f) * tie_scale - bias;
    }
    if (u < 0.40) {
      const float mag = range * scale * static_cast<float>(1.0 + 4.0 * urand());
      return urand() < 0.5 ? mag : -mag;
    }
    if (u < 0.42) return 0.0f;
    if (u < 0.44) return -0.0f;
    return static_cast<float>((urand() * 2.0 - 1.0) * 1.3 * range * scale) - bias;
  }
};

static void fill_tensor(Tensor& t, InType type, Layout l, const int64_t* size, ValueGen& gen,
                        const std::vector<float>& bias_per_c) {
  t.type = type;
  for (int d = 0; d < 4; ++d) t.size[d] = size[d];
  make_strides(l, size, t.stride, &t.offset);
  int64_t max_idx = t.offset;
  for (int d = 0; d < 4; ++d)
    if (size[d] > 0) max_idx += (size[d] - 1) * t.stride[d];
  t.alloc = max_idx + 1 + 16;
  t.host.assign(static_cast<size_t>(t.alloc * elem_size(type)), 0);
  // Fill the gaps with garbage so reads outside the view would show.
  for (int64_t i = 0; i < t.alloc; ++i) store_elem(type, t.host.data(), i, 1000.0f + i % 7);
  for (int64_t n = 0; n < size[0]; ++n)
    for (int64_t c = 0; c < size[1]; ++c)
      for (int64_t h = 0; h < size[2]; ++h)
        for (int64_t w = 0; w < size[3]; ++w)
          store_elem(type, t.host.data(), t.index(n, c, h, w),
                     gen.value(bias_per_c.empty() ? 0.0f : bias_per_c[c]));
  CUDA_CHECK(cudaMalloc(&t.dev, t.host.size()));
  CUDA_CHECK(cudaMemcpy(t.dev, t.host.data(), t.host.size(), cudaMemcpyHostToDevice));
}

template <typename T>
static T* to_device(const std::vector<T>& v) {
  T* d = nullptr;
  CUDA_CHECK(cudaMalloc(&d, std::max<size_t>(1, v.size() * sizeof(T))));
  if (!v.empty()) CUDA_CHECK(cudaMemcpy(d, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
  return d;
}

constexpr int kGuard = 64;
constexpr unsigned char kSentinel = 0xCD;

// Runs `launch(out)` on a sentinel-filled buffer of `bytes` + guard and compares.
template <typename Launch>
static void compare_output(const std::string& name, const std::vector<uint8_t>& expect,
                           Launch launch) {
  const size_t bytes = expect.size();
  uint8_t* d_out = nullptr;
  CUDA_CHECK(cudaMalloc(&d_out, bytes + kGuard));
  CUDA_CHECK(cudaMemset(d_out, kSentinel, bytes + kGuard));
  KernelStatus st = launch(d_out);
  cudaError_t sync = cudaDeviceSynchronize();
  std::vector<uint8_t> got(bytes + kGuard);
  CUDA_CHECK(cudaMemcpy(got.data(), d_out, bytes + kGuard, cudaMemcpyDeviceToHost));
  CUDA_CHECK(cudaFree(d_out));
  if (!st.ok) {
    record(false, name, "status failure: " + st.message);
    return;
  }
  if (sync != cudaSuccess) {
    record(false, name, std::string("sync: ") + cudaGetErrorString(sync));
    return;
  }
  for (size_t i = 0; i < bytes; ++i) {
    if (got[i] != expect[i]) {
      char buf[160];
      std::snprintf(buf, sizeof buf, "first mismatch at byte %zu of %zu: got 0x%02x want 0x%02x", i,
                    bytes, got[i], expect[i]);
      record(false, name, buf);
      return;
    }
  }
  for (int i = 0; i < kGuard; ++i) {
    if (got[bytes + i] != kSentinel) {
      record(false, name, "wrote past the end of the output");
      return;
    }
  }
  record(true, name);
}

// Host reference of the activation / weight kernels: NHWC, c_pad channels.
// bias empty -> quantize_value (weights), scales: one, or one per n.
static std::vector<uint8_t> reference_nhwc(const Tensor& t, const std::vector<float>& bias,
                                           const std::vector<float>& scales, float eps, int bits,
                                           int c_pad, bool int4) {
  const int64_t N = t.size[0], C = t.size[1], H = t.size[2], W = t.size[3];
  const int64_t row = int4 ? c_pad / 2 : c_pad;
  std::vector<uint8_t> out(static_cast<size_t>(N * H * W * row), 0);
  std::vector<int8_t> codes(c_pad);
  for (int64_t n = 0; n < N; ++n) {
    const float s = effective_scale(scales[scales.size() == 1 ? 0 : n], eps);
    for (int64_t h = 0; h < H; ++h)
      for (int64_t w = 0; w < W; ++w) {
        for (int64_t c = 0; c < c_pad; ++c) {
          if (c >= C) {
            codes[c] = 0;
          } else if (bias.empty()) {
            codes[c] = quantize_value(t.at(n, c, h, w), s, bits);
          } else {
            codes[c] = quantize_activation(t.at(n, c, h, w), bias[c], s, bits);
          }
        }
        uint8_t* dst = out.data() + ((n * H + h) * W + w) * row;
        for (int64_t b = 0; b < row; ++b)
          dst[b] = int4 ? pack_int4_pair(codes[2 * b], codes[2 * b + 1])
                        : static_cast<uint8_t>(codes[b]);
      }
  }
  return out;
}

static int round_up(int v, int m) { return (v + m - 1) / m * m; }

// ---- activation tests -----------------------------------------------------------
struct ScaleCase {
  const char* name;
  float scale;  // the stored (learnt) scale
  float eps;
  bool ties;  // bias multiples of scale / 2 -> exact ties
};

static void test_activations() {
  const int64_t shapes[][4] = {{1, 3, 5, 7},  {2, 20, 4, 9}, {3, 64, 3, 5}, {1, 1, 6, 11},
                               {2, 37, 1, 1}, {1, 48, 7, 2}, {2, 130, 2, 3}};
  const ScaleCase scales[] = {{"tie0.25", 0.25f, 1e-8f, true},
                              {"s0.0371", 0.0371f, 1e-8f, false},
                              {"below_eps", 1e-9f, 0.125f, true},
                              {"negative", -2.0f, 0.0625f, true}};
  const InType types[] = {InType::kFloat32, InType::kFloat16, InType::kBFloat16};
  int cfg = 0;
  for (const auto& shape : shapes)
    for (InType type : types)
      for (Layout layout : kAllLayouts) {
        // Rotate through scale cases / bit widths so every combination of
        // (shape, type, layout) runs but the total stays small.
        const ScaleCase sc = scales[cfg % 4];
        const int bits8 = (cfg % 3 == 0) ? 8 : ((cfg % 3 == 1) ? 4 : 3);
        const int bits4 = (cfg % 2 == 0) ? 4 : 2;
        ++cfg;
        const int C = static_cast<int>(shape[1]);
        const float eff = effective_scale(sc.scale, sc.eps);
        std::vector<float> bias(C);
        for (int c = 0; c < C; ++c)
          bias[c] = sc.ties ? eff * 0.5f * static_cast<float>(irand(-6, 6))
                            : static_cast<float>(urand() * 0.2 - 0.1);
        ValueGen gen{eff, sc.ties ? eff : 0.0f, 8};
        Tensor t;
        fill_tensor(t, type, layout, shape, gen, bias);
        float* d_bias = to_device(bias);
        float* d_scale = to_device(std::vector<float>{sc.scale});
        char base[200];
        std::snprintf(base, sizeof base, "act %s %s [%lld,%lld,%lld,%lld] %s", type_name(type),
                      layout_name(layout), (long long)shape[0], (long long)shape[1],
                      (long long)shape[2], (long long)shape[3], sc.name);
        const Tensor4dView v = t.view();
        // int8 with c_pad = C, C + 1, round_up(C, 16)
        for (int c_pad : {C, C + 1, round_up(C, 16)}) {
          auto expect = reference_nhwc(t, bias, {sc.scale}, sc.eps, bits8, c_pad, false);
          compare_output(std::string(base) + " int8 bits=" + std::to_string(bits8) +
                             " c_pad=" + std::to_string(c_pad),
                         expect, [&](uint8_t* out) {
                           return quantize_activation_int8_nhwc(v, d_bias, d_scale, sc.eps, bits8,
                                                                c_pad,
                                                                reinterpret_cast<int8_t*>(out), 0);
                         });
        }
        for (int c_pad : {round_up(C, 2), round_up(C, 32) + 2}) {
          auto expect = reference_nhwc(t, bias, {sc.scale}, sc.eps, bits4, c_pad, true);
          compare_output(std::string(base) + " int4 bits=" + std::to_string(bits4) +
                             " c_pad=" + std::to_string(c_pad),
                         expect, [&](uint8_t* out) {
                           return quantize_activation_int4_nhwc(v, d_bias, d_scale, sc.eps, bits4,
                                                                c_pad, out, 0);
                         });
        }
        CUDA_CHECK(cudaFree(d_bias));
        CUDA_CHECK(cudaFree(d_scale));
      }
}

// ---- weight tests --------------------------------------------------------------------
static void test_weights() {
  const int64_t shapes[][4] = {
      {5, 3, 3, 3}, {16, 20, 1, 1}, {7, 64, 3, 5}, {4, 33, 2, 2}, {1, 1, 1, 1}};
  const InType types[] = {InType::kFloat32, InType::kFloat16, InType::kBFloat16};
  const Layout layouts[] = {Layout::kNCHW, Layout::kCL, Layout::kCLOffset, Layout::kStridedW,
                            Layout::kPermuted};
  int cfg = 0;
  for (const auto& shape : shapes)
    for (InType type : types)
      for (Layout layout : layouts)
        for (bool per_channel : {false, true}) {
          const int K = static_cast<int>(shape[0]);
          const int C = static_cast<int>(shape[1]);
          const int bits = (cfg++ % 2 == 0) ? 4 : 3;
          const float eps = 1e-3f;
          std::vector<float> scales(per_channel ? K : 1);
          for (size_t k = 0; k < scales.size(); ++k)
            scales[k] = (k % 3 == 0) ? 0.125f : static_cast<float>(0.01 + 0.1 * urand());
          if (scales.size() > 1) scales[1] = 1e-6f;  // below eps
          // Ties are exact for scale 0.125 (k % 3 == 0 rows) with zero bias.
          ValueGen gen{0.1f, 0.125f, 4};
          Tensor t;
          fill_tensor(t, type, layout, shape, gen, {});
          float* d_scale = to_device(scales);
          const Tensor4dView v = t.view();
          char base[200];
          std::snprintf(base, sizeof base, "weight %s %s [%d,%d,%lld,%lld] %s bits=%d",
                        type_name(type), layout_name(layout), K, C, (long long)shape[2],
                        (long long)shape[3], per_channel ? "per_channel" : "per_tensor", bits);
          for (int c_pad : {round_up(C, 2), round_up(C, 32)}) {
            auto expect = reference_nhwc(t, {}, scales, eps, bits, c_pad, true);
            compare_output(std::string(base) + " c_pad=" + std::to_string(c_pad), expect,
                           [&](uint8_t* out) {
                             return quantize_pack_weight_int4(v, d_scale, per_channel, eps, bits,
                                                              c_pad, out, 0);
                           });
          }
          CUDA_CHECK(cudaFree(d_scale));
        }
}

// ---- unpack / repack -----------------------------------------------------------------
static void test_relayout() {
  const int64_t rows = 37;
  for (int c_in : {2, 4, 20, 64}) {
    std::vector<uint8_t> packed(static_cast<size_t>(rows * c_in / 2));
    for (auto& b : packed) b = static_cast<uint8_t>(irand(0, 255));
    uint8_t* d_packed = to_device(packed);
    for (int channels : {c_in, c_in - 1, c_in / 2}) {
      for (int c_out : {channels, round_up(channels, 2), round_up(channels, 16) + 16, c_in}) {
        if (c_out < channels) continue;
        auto code = [&](int64_t r, int c) -> int8_t {
          return c < channels ? unpack_int4(packed[r * (c_in / 2) + c / 2], c & 1) : 0;
        };
        char name[160];
        std::snprintf(name, sizeof name, "unpack c_in=%d channels=%d c_out=%d", c_in, channels,
                      c_out);
        std::vector<uint8_t> expect(static_cast<size_t>(rows * c_out));
        for (int64_t r = 0; r < rows; ++r)
          for (int c = 0; c < c_out; ++c) expect[r * c_out + c] = static_cast<uint8_t>(code(r, c));
        compare_output(name, expect, [&](uint8_t* out) {
          return unpack_int4_to_int8(d_packed, rows, c_in, channels, c_out,
                                     reinterpret_cast<int8_t*>(out), 0);
        });
        if (c_out % 2 == 0) {
          std::snprintf(name, sizeof name, "repack c_in=%d channels=%d c_out=%d", c_in, channels,
                        c_out);
          std::vector<uint8_t> expect4(static_cast<size_t>(rows * c_out / 2));
          for (int64_t r = 0; r < rows; ++r)
            for (int b = 0; b < c_out / 2; ++b)
              expect4[r * (c_out / 2) + b] = pack_int4_pair(code(r, 2 * b), code(r, 2 * b + 1));
          compare_output(name, expect4, [&](uint8_t* out) {
            return repack_int4(d_packed, rows, c_in, channels, c_out, out, 0);
          });
        }
      }
    }
    CUDA_CHECK(cudaFree(d_packed));
  }
}

// ---- argument validation -------------------------------------------------------------
static void expect_failure(const std::string& name, const KernelStatus& st, const char* word) {
  const bool ok = !st.ok && st.message.find(word) != std::string::npos;
  record(ok, name,
         ok ? ""
            : ("status ok=" + std::to_string(st.ok) + " message='" + st.message +
               "' (expected failure naming '" + word + "')"));
}

static void test_validation() {
  const int64_t shape[4] = {2, 5, 3, 4};
  ValueGen gen{0.1f, 0.0f, 4};
  Tensor t;
  fill_tensor(t, InType::kFloat32, Layout::kNCHW, shape, gen, {});
  const Tensor4dView v = t.view();
  float* d_bias = to_device(std::vector<float>(5, 0.0f));
  float* d_scale = to_device(std::vector<float>{0.1f});
  uint8_t* d_out = nullptr;
  CUDA_CHECK(cudaMalloc(&d_out, 4096));
  int8_t* d_out8 = reinterpret_cast<int8_t*>(d_out);
  expect_failure("validate int8 c_pad < C",
                 quantize_activation_int8_nhwc(v, d_bias, d_scale, 1e-8f, 4, 4, d_out8, 0),
                 "c_pad");
  expect_failure("validate int4 c_pad < C",
                 quantize_activation_int4_nhwc(v, d_bias, d_scale, 1e-8f, 4, 4, d_out, 0), "c_pad");
  expect_failure("validate int4 odd c_pad",
                 quantize_activation_int4_nhwc(v, d_bias, d_scale, 1e-8f, 4, 7, d_out, 0), "c_pad");
  expect_failure("validate weight odd c_pad",
                 quantize_pack_weight_int4(v, d_scale, false, 1e-8f, 4, 7, d_out, 0), "c_pad");
  expect_failure("validate int8 bits=9",
                 quantize_activation_int8_nhwc(v, d_bias, d_scale, 1e-8f, 9, 8, d_out8, 0), "bits");
  expect_failure("validate int4 bits=5",
                 quantize_activation_int4_nhwc(v, d_bias, d_scale, 1e-8f, 5, 8, d_out, 0), "bits");
  expect_failure("validate null scale",
                 quantize_activation_int8_nhwc(v, d_bias, nullptr, 1e-8f, 4, 8, d_out8, 0),
                 "scale_a");
  Tensor4dView neg = v;
  neg.size[2] = -1;
  expect_failure("validate negative size",
                 quantize_activation_int8_nhwc(neg, d_bias, d_scale, 1e-8f, 4, 8, d_out8, 0), "x");
  expect_failure("validate unpack odd c_in", unpack_int4_to_int8(d_out, 4, 5, 4, 8, d_out8, 0),
                 "c_in");
  expect_failure("validate unpack channels > c_in",
                 unpack_int4_to_int8(d_out, 4, 4, 6, 8, d_out8, 0), "channels");
  expect_failure("validate unpack c_out < channels",
                 unpack_int4_to_int8(d_out, 4, 8, 6, 4, d_out8, 0), "c_out");
  expect_failure("validate repack odd c_out", repack_int4(d_out, 4, 8, 6, 7, d_out, 0), "c_out");

  // Empty tensors: success, nothing launched, null output accepted.
  Tensor4dView empty = v;
  empty.size[0] = 0;
  KernelStatus st = quantize_activation_int8_nhwc(empty, d_bias, d_scale, 1e-8f, 4, 8, nullptr, 0);
  record(st.ok, "empty N=0 int8", st.message);
  st = quantize_activation_int4_nhwc(empty, d_bias, d_scale, 1e-8f, 4, 8, nullptr, 0);
  record(st.ok, "empty N=0 int4", st.message);
  st = quantize_pack_weight_int4(empty, d_scale, true, 1e-8f, 4, 8, nullptr, 0);
  record(st.ok, "empty K=0 weight", st.message);
  st = unpack_int4_to_int8(nullptr, 0, 8, 8, 8, nullptr, 0);
  record(st.ok, "empty rows=0 unpack", st.message);
  st = repack_int4(nullptr, 0, 8, 8, 8, nullptr, 0);
  record(st.ok, "empty rows=0 repack", st.message);
  record(cudaDeviceSynchronize() == cudaSuccess && cudaGetLastError() == cudaSuccess,
         "no sticky CUDA error after validation tests");
  CUDA_CHECK(cudaFree(d_bias));
  CUDA_CHECK(cudaFree(d_scale));
  CUDA_CHECK(cudaFree(d_out));
}

// ---- bandwidth ---------------------------------------------------------------------------
static void bench() {
  const int64_t N = 32, C = 256, H = 56, W = 56;
  const int64_t shape[4] = {N, C, H, W};
  const int64_t numel = N * C * H * W;
  void* d_in = nullptr;
  uint8_t* d_out = nullptr;
  CUDA_CHECK(cudaMalloc(&d_in, numel * 4 * 2 + 64));
  CUDA_CHECK(cudaMemset(d_in, 0x3c, numel * 4 * 2 + 64));
  CUDA_CHECK(cudaMalloc(&d_out, numel));
  float* d_bias = to_device(std::vector<float>(C, 0.01f));
  float* d_scale = to_device(std::vector<float>{0.05f});
  cudaEvent_t e0, e1;
  CUDA_CHECK(cudaEventCreate(&e0));
  CUDA_CHECK(cudaEventCreate(&e1));
  {
    CUDA_CHECK(cudaMemcpy(d_out, d_in, numel, cudaMemcpyDeviceToDevice));
    CUDA_CHECK(cudaEventRecord(e0));
    for (int i = 0; i < 20; ++i)
      CUDA_CHECK(cudaMemcpyAsync(d_out, d_in, numel, cudaMemcpyDeviceToDevice));
    CUDA_CHECK(cudaEventRecord(e1));
    CUDA_CHECK(cudaEventSynchronize(e1));
    float ms = 0;
    CUDA_CHECK(cudaEventElapsedTime(&ms, e0, e1));
    std::printf("bench memcpy D2D %lld bytes: %.1f us, %.0f GB/s (read+write)\n", (long long)numel,
                ms * 1000 / 20, 2.0 * numel / (ms / 20 * 1e-3) / 1e9);
  }
  const InType types[] = {InType::kFloat32, InType::kFloat16, InType::kBFloat16};
  const Layout layouts[] = {Layout::kNCHW, Layout::kCL, Layout::kStridedW};
  for (InType type : types)
    for (Layout layout : layouts)
      for (bool int4 : {false, true}) {
        Tensor4dView v;
        v.data = d_in;
        v.type = type;
        int64_t off = 0;
        for (int d = 0; d < 4; ++d) v.size[d] = shape[d];
        make_strides(layout, shape, v.stride, &off);
        auto launch = [&]() {
          return int4
                     ? quantize_activation_int4_nhwc(v, d_bias, d_scale, 1e-8f, 4, (int)C, d_out, 0)
                     : quantize_activation_int8_nhwc(v, d_bias, d_scale, 1e-8f, 4, (int)C,
                                                     reinterpret_cast<int8_t*>(d_out), 0);
        };
        KernelStatus st = launch();
        if (!st.ok) {
          std::printf("bench launch failed: %s\n", st.message.c_str());
          continue;
        }
        CUDA_CHECK(cudaEventRecord(e0));
        const int iters = 20;
        for (int i = 0; i < iters; ++i) launch();
        CUDA_CHECK(cudaEventRecord(e1));
        CUDA_CHECK(cudaEventSynchronize(e1));
        float ms = 0;
        CUDA_CHECK(cudaEventElapsedTime(&ms, e0, e1));
        const double us = ms * 1000.0 / iters;
        const double bytes = numel * (double)elem_size(type) + numel / (int4 ? 2.0 : 1.0);
        std::printf("bench %s %-14s %s [%lld,%lld,%lld,%lld]: %8.1f us, %6.0f GB/s\n",
                    type_name(type), layout_name(layout), int4 ? "int4" : "int8", (long long)N,
                    (long long)C, (long long)H, (long long)W, us, bytes / (us * 1e-6) / 1e9);
      }
  CUDA_CHECK(cudaFree(d_in));
  CUDA_CHECK(cudaFree(d_out));
  CUDA_CHECK(cudaFree(d_bias));
  CUDA_CHECK(cudaFree(d_scale));
}

int main(int argc, char** argv) {
  bool do_bench = true;
  for (int i = 1; i < argc; ++i)
    if (std::strcmp(argv[i], "--no-bench") == 0) do_bench = false;
  int dev = 0;
  CUDA_CHECK(cudaGetDevice(&dev));
  cudaDeviceProp prop;
  CUDA_CHECK(cudaGetDeviceProperties(&prop, dev));
  std::printf("device: %s (sm_%d%d)\n", prop.name, prop.major, prop.minor);

  test_activations();
  test_weights();
  test_relayout();
  test_validation();
  std::printf("%d passed, %d failed\n", g_passed, g_failed);
  if (do_bench) bench();
  return g_failed == 0 ? 0 : 1;
}
