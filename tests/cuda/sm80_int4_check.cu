// Standalone correctness harness for the CUTLASS sm80 int4 fprop backend
// (csrc/kernels/conv_sm80_int4*.cu). No torch, no gtest.
//
// For each shape: random int4 codes in [-8, 7] packed two per byte (even
// channel in the low nibble, q4conv::pack_int4_pair), random per-channel alpha
// and bias; the backend output is compared against a naive GPU reference conv
// (int32 sums, itself checked against a host loop on the small shapes)
// followed by the same fp32 epilogue on the host:
//   fp32 output: exact;  fp16 / bf16: within 1 ulp of the RN-rounded reference.
// The output (plus a guard tail) is poisoned before every run; the guard must
// stay untouched. Exit code 0 iff everything passed. Built by
// tests/cuda/CMakeLists.txt.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "kernels/conv_kernels.h"
#include "quant.h"

using q4conv::ConvShape;
using q4conv::OutType;

#define CUDA_OK(expr)                                                                         \
  do {                                                                                        \
    cudaError_t e_ = (expr);                                                                  \
    if (e_ != cudaSuccess) {                                                                  \
      std::printf("CUDA error %s at %s:%d: %s\n", cudaGetErrorString(e_), __FILE__, __LINE__, \
                  #expr);                                                                     \
      std::exit(2);                                                                           \
    }                                                                                         \
  } while (0)

// ---- naive GPU reference: int32 sums from packed codes ----------------------
__device__ int8_t code_at(const uint8_t* packed, long long elem) {
  return q4conv::unpack_int4(packed[elem >> 1], (elem & 1) != 0);
}

__global__ void reference_conv(ConvShape s, const uint8_t* act, const uint8_t* wgt, int32_t* acc) {
  const long long total = 1LL * s.n * s.p * s.q * s.k;
  for (long long idx = blockIdx.x * 1LL * blockDim.x + threadIdx.x; idx < total;
       idx += 1LL * gridDim.x * blockDim.x) {
    const int k = idx % s.k;
    const int q = (idx / s.k) % s.q;
    const int p = (idx / (1LL * s.k * s.q)) % s.p;
    const int n = idx / (1LL * s.k * s.q * s.p);
    int32_t sum = 0;
    for (int r = 0; r < s.r; ++r) {
      const int h = p * s.stride_h - s.pad_h + r * s.dil_h;
      if (h < 0 || h >= s.h) continue;
      for (int t = 0; t < s.s; ++t) {
        const int w = q * s.stride_w - s.pad_w + t * s.dil_w;
        if (w < 0 || w >= s.w) continue;
        const long long a0 = ((1LL * n * s.h + h) * s.w + w) * s.c;
        const long long b0 = ((1LL * k * s.r + r) * s.s + t) * s.c;
        for (int c = 0; c < s.c; ++c) sum += code_at(act, a0 + c) * code_at(wgt, b0 + c);
      }
    }
    acc[idx] = sum;
  }
}

// Host loop (small shapes only), to validate the GPU reference itself.
static std::vector<int32_t> host_conv(const ConvShape& s, const std::vector<int8_t>& a,
                                      const std::vector<int8_t>& b) {
  std::vector<int32_t> out(1LL * s.n * s.p * s.q * s.k);
  for (int n = 0; n < s.n; ++n)
    for (int p = 0; p < s.p; ++p)
      for (int q = 0; q < s.q; ++q)
        for (int k = 0; k < s.k; ++k) {
          int32_t sum = 0;
          for (int r = 0; r < s.r; ++r) {
            const int h = p * s.stride_h - s.pad_h + r * s.dil_h;
            if (h < 0 || h >= s.h) continue;
            for (int t = 0; t < s.s; ++t) {
              const int w = q * s.stride_w - s.pad_w + t * s.dil_w;
              if (w < 0 || w >= s.w) continue;
              for (int c = 0; c < s.c; ++c)
                sum += a[((1LL * n * s.h + h) * s.w + w) * s.c + c] *
                       b[((1LL * k * s.r + r) * s.s + t) * s.c + c];
            }
          }
          out[((1LL * n * s.p + p) * s.q + q) * s.k + k] = sum;
        }
  return out;
}

// ---- host epilogue reference --------------------------------------------------
static float epilogue_ref(int32_t acc, float alpha, const float* bias, int k, bool relu) {
  volatile float prod = alpha * static_cast<float>(acc);  // volatile: no FMA contraction
  float z = prod + (bias ? bias[k] : 0.f);
  if (relu) z = z < 0.f ? 0.f : z;
  return z;
}

static uint16_t to_bits16(OutType t, float v) {
  if (t == OutType::kFloat16) {
    __half h = __float2half_rn(v);
    uint16_t u;
    std::memcpy(&u, &h, 2);
    return u;
  }
  __nv_bfloat16 h = __float2bfloat16_rn(v);
  uint16_t u;
  std::memcpy(&u, &h, 2);
  return u;
}

// Distance in ulps between two finite 16-bit floats of the same format.
static int ulp_dist16(uint16_t a, uint16_t b) {
  auto ordered = [](uint16_t x) -> int { return (x & 0x8000) ? -(int)(x & 0x7FFF) : (int)x; };
  return std::abs(ordered(a) - ordered(b));
}
static bool is_nan16(OutType t, uint16_t x) {
  if (t == OutType::kFloat16) return (x & 0x7C00) == 0x7C00 && (x & 0x03FF);
  return (x & 0x7F80) == 0x7F80 && (x & 0x007F);
}

static const char* type_name(OutType t) {
  return t == OutType::kFloat32 ? "fp32" : (t == OutType::kFloat16 ? "fp16" : "bf16");
}
static size_t type_size(OutType t) { return t == OutType::kFloat32 ? 4 : 2; }

struct Case {
  const char* name;
  ConvShape s;
};

static ConvShape make_shape(int n, int h, int w, int c, int k, int r, int s, int pad, int stride,
                            int dil) {
  ConvShape x;
  x.n = n;
  x.h = h;
  x.w = w;
  x.c = c;
  x.k = k;
  x.r = r;
  x.s = s;
  x.pad_h = x.pad_w = pad;
  x.stride_h = x.stride_w = stride;
  x.dil_h = x.dil_w = dil;
  x.p = (h + 2 * pad - dil * (r - 1) - 1) / stride + 1;
  x.q = (w + 2 * pad - dil * (s - 1) - 1) / stride + 1;
  return x;
}

int main() {
  int dev = 0;
  CUDA_OK(cudaSetDevice(dev));
  cudaDeviceProp prop{};
  CUDA_OK(cudaGetDeviceProperties(&prop, dev));
  std::printf("device: %s (sm_%d%d)\n", prop.name, prop.major, prop.minor);

  std::vector<Case> cases = {
      {"C32 K8 3x3 pad1 stride2 dil2 7x9 N1", make_shape(1, 7, 9, 32, 8, 3, 3, 1, 2, 2)},
      {"C64 K40 1x1 10x12 N2", make_shape(2, 10, 12, 64, 40, 1, 1, 0, 1, 1)},
      {"C96 K64 3x3 pad1 14x14 N3", make_shape(3, 14, 14, 96, 64, 3, 3, 1, 1, 1)},
      {"ResNet C256 K256 3x3 pad1 14x14 N8", make_shape(8, 14, 14, 256, 256, 3, 3, 1, 1, 1)},
  };

  int failures = 0;
  cudaStream_t stream;
  CUDA_OK(cudaStreamCreate(&stream));
  std::mt19937 rng(12345);

  // supports(): what must be rejected.
  {
    ConvShape bad_c = make_shape(1, 8, 8, 48, 16, 3, 3, 1, 1, 1);
    ConvShape odd_k = make_shape(1, 8, 8, 32, 12, 3, 3, 1, 1, 1);
    ConvShape bad_p = make_shape(1, 8, 8, 32, 16, 3, 3, 1, 1, 1);
    bad_p.p += 1;
    struct {
      const char* what;
      ConvShape s;
      OutType t;
      bool expect;
    } checks[] = {
        {"c=48 (not a multiple of 32)", bad_c, OutType::kFloat32, false},
        {"k=12 fp32 (multiple of 4)", odd_k, OutType::kFloat32, true},
        {"k=12 fp16 (not a multiple of 8)", odd_k, OutType::kFloat16, false},
        {"k=12 bf16 (not a multiple of 8)", odd_k, OutType::kBFloat16, false},
        {"inconsistent p", bad_p, OutType::kFloat32, false},
    };
    for (auto& c : checks) {
      const bool got = q4conv::sm80_int4_supports(c.s, c.t);
      std::printf("supports(%s) = %d (expect %d)%s\n", c.what, got, c.expect,
                  got == c.expect ? "" : "  <-- FAIL");
      if (got != c.expect) ++failures;
    }
  }

  for (const Case& cs : cases) {
    const ConvShape& s = cs.s;
    const long long act_elems = 1LL * s.n * s.h * s.w * s.c;
    const long long wgt_elems = 1LL * s.k * s.r * s.s * s.c;
    const long long out_elems = 1LL * s.n * s.p * s.q * s.k;
    std::printf(
        "\n== %s: n=%d h=%d w=%d c=%d k=%d r=%d s=%d p=%d q=%d pad=%d,%d stride=%d,%d dil=%d,%d\n",
        cs.name, s.n, s.h, s.w, s.c, s.k, s.r, s.s, s.p, s.q, s.pad_h, s.pad_w, s.stride_h,
        s.stride_w, s.dil_h, s.dil_w);

    std::uniform_int_distribution<int> code(-8, 7);
    std::vector<int8_t> a(act_elems), b(wgt_elems);
    for (auto& v : a) v = static_cast<int8_t>(code(rng));
    for (auto& v : b) v = static_cast<int8_t>(code(rng));
    std::vector<uint8_t> ap(act_elems / 2), bp(wgt_elems / 2);
    for (long long i = 0; i < act_elems / 2; ++i)
      ap[i] = q4conv::pack_int4_pair(a[2 * i], a[2 * i + 1]);
    for (long long i = 0; i < wgt_elems / 2; ++i)
      bp[i] = q4conv::pack_int4_pair(b[2 * i], b[2 * i + 1]);

    std::uniform_real_distribution<float> alpha_d(-0.01f, 0.03f), bias_d(-2.f, 2.f);
    std::vector<float> alpha(s.k), bias(s.k);
    for (auto& v : alpha) v = alpha_d(rng);
    for (auto& v : bias) v = bias_d(rng);

    uint8_t *d_a, *d_b;
    int32_t* d_acc;
    float *d_alpha, *d_bias;
    CUDA_OK(cudaMalloc(&d_a, ap.size()));
    CUDA_OK(cudaMalloc(&d_b, bp.size()));
    CUDA_OK(cudaMalloc(&d_acc, out_elems * sizeof(int32_t)));
    CUDA_OK(cudaMalloc(&d_alpha, s.k * sizeof(float)));
    CUDA_OK(cudaMalloc(&d_bias, s.k * sizeof(float)));
    CUDA_OK(cudaMemcpy(d_a, ap.data(), ap.size(), cudaMemcpyHostToDevice));
    CUDA_OK(cudaMemcpy(d_b, bp.data(), bp.size(), cudaMemcpyHostToDevice));
    CUDA_OK(cudaMemcpy(d_alpha, alpha.data(), s.k * sizeof(float), cudaMemcpyHostToDevice));
    CUDA_OK(cudaMemcpy(d_bias, bias.data(), s.k * sizeof(float), cudaMemcpyHostToDevice));

    reference_conv<<<1024, 256>>>(s, d_a, d_b, d_acc);
    CUDA_OK(cudaGetLastError());
    CUDA_OK(cudaDeviceSynchronize());
    std::vector<int32_t> acc(out_elems);
    CUDA_OK(cudaMemcpy(acc.data(), d_acc, out_elems * sizeof(int32_t), cudaMemcpyDeviceToHost));
    if (1LL * out_elems * s.r * s.s * s.c < 200000000LL) {
      std::vector<int32_t> h = host_conv(s, a, b);
      const bool same = h == acc;
      std::printf("GPU reference vs host loop: %s\n", same ? "identical" : "MISMATCH");
      if (!same) ++failures;
    }

    const size_t guard_bytes = 4096;
    const size_t max_out_bytes = out_elems * 4 + guard_bytes;
    uint8_t* d_out;
    CUDA_OK(cudaMalloc(&d_out, max_out_bytes));
    std::vector<uint8_t> out_host(max_out_bytes);

    for (OutType t : {OutType::kFloat32, OutType::kFloat16, OutType::kBFloat16}) {
      const bool sup = q4conv::sm80_int4_supports(s, t);
      if (!sup) {
        std::printf("[%s] supports() = false  <-- FAIL (expected support)\n", type_name(t));
        ++failures;
        continue;
      }
      const size_t ws_bytes = q4conv::sm80_int4_workspace_bytes(s, t);
      void* d_ws = nullptr;
      if (ws_bytes) CUDA_OK(cudaMalloc(&d_ws, ws_bytes));
      const size_t out_bytes = out_elems * type_size(t);

      for (int with_bias = 0; with_bias < 2; ++with_bias) {
        for (int relu = 0; relu < 2; ++relu) {
          CUDA_OK(cudaMemset(d_out, 0xFF, max_out_bytes));  // NaN poison + guard
          q4conv::EpilogueArgs ep;
          ep.alpha = d_alpha;
          ep.bias = with_bias ? d_bias : nullptr;
          ep.relu = relu != 0;
          ep.out_type = t;
          ep.out = d_out;
          q4conv::KernelStatus st = q4conv::sm80_int4_conv(s, d_a, d_b, ep, d_ws, stream);
          char tag[96];
          std::snprintf(tag, sizeof(tag), "[%s bias=%d relu=%d]", type_name(t), with_bias, relu);
          if (!st.ok) {
            std::printf("%s kernel failed: %s  <-- FAIL\n", tag, st.message.c_str());
            ++failures;
            continue;
          }
          cudaError_t e = cudaStreamSynchronize(stream);
          if (e != cudaSuccess) {
            std::printf("%s CUDA error after run: %s  <-- FAIL\n", tag, cudaGetErrorString(e));
            return 3;
          }
          CUDA_OK(cudaMemcpy(out_host.data(), d_out, max_out_bytes, cudaMemcpyDeviceToHost));

          long long bad = 0, exact = 0, nonzero_relu = 0;
          int max_ulp = 0;
          const float* bptr = with_bias ? bias.data() : nullptr;
          for (long long i = 0; i < out_elems; ++i) {
            const int k = static_cast<int>(i % s.k);
            const float ref = epilogue_ref(acc[i], alpha[k], bptr, k, relu != 0);
            if (ref != 0.f) ++nonzero_relu;
            if (t == OutType::kFloat32) {
              float got;
              std::memcpy(&got, &out_host[i * 4], 4);
              if (got == ref) {
                ++exact;
              } else {
                if (bad < 5)
                  std::printf("  %s mismatch at %lld (k=%d acc=%d): got %.9g want %.9g\n", tag, i,
                              k, acc[i], got, ref);
                ++bad;
              }
            } else {
              uint16_t got;
              std::memcpy(&got, &out_host[i * 2], 2);
              const uint16_t want = to_bits16(t, ref);
              const int d = is_nan16(t, got) ? 1 << 20 : ulp_dist16(got, want);
              if (d == 0) ++exact;
              if (d > max_ulp) max_ulp = d;
              if (d > 1) {
                if (bad < 5)
                  std::printf(
                      "  %s mismatch at %lld (k=%d acc=%d): got 0x%04x want 0x%04x (ref %.9g)\n",
                      tag, i, k, acc[i], got, want, ref);
                ++bad;
              }
            }
          }
          long long guard_bad = 0;
          for (size_t i = out_bytes; i < max_out_bytes; ++i) guard_bad += out_host[i] != 0xFF;
          const bool ok = bad == 0 && guard_bad == 0;
          std::printf(
              "%s %s: %lld/%lld exact, max_ulp=%d, mismatches=%lld, guard bytes touched=%lld, "
              "nonzero refs=%lld\n",
              tag, ok ? "PASS" : "FAIL", exact, out_elems,
              t == OutType::kFloat32 ? (bad ? -1 : 0) : max_ulp, bad, guard_bad, nonzero_relu);
          if (!ok) ++failures;
        }
      }
      if (d_ws) CUDA_OK(cudaFree(d_ws));
    }
    CUDA_OK(cudaFree(d_out));
    CUDA_OK(cudaFree(d_a));
    CUDA_OK(cudaFree(d_b));
    CUDA_OK(cudaFree(d_acc));
    CUDA_OK(cudaFree(d_alpha));
    CUDA_OK(cudaFree(d_bias));
  }

  // Misaligned output pointer: must be refused with a message, not crash.
  {
    ConvShape s = cases[1].s;
    void *d_a, *d_b, *d_ws, *d_out;
    float* d_alpha;
    CUDA_OK(cudaMalloc(&d_a, 1LL * s.n * s.h * s.w * s.c / 2));
    CUDA_OK(cudaMalloc(&d_b, 1LL * s.k * s.r * s.s * s.c / 2));
    CUDA_OK(cudaMalloc(&d_ws, q4conv::sm80_int4_workspace_bytes(s, OutType::kFloat32)));
    CUDA_OK(cudaMalloc(&d_out, 1LL * s.n * s.p * s.q * s.k * 4 + 64));
    CUDA_OK(cudaMalloc(&d_alpha, s.k * sizeof(float)));
    q4conv::EpilogueArgs ep;
    ep.alpha = d_alpha;
    ep.out = static_cast<char*>(d_out) + 4;
    q4conv::KernelStatus st = q4conv::sm80_int4_conv(s, d_a, d_b, ep, d_ws, stream);
    std::printf("\nmisaligned output refused: %s (%s)\n", !st.ok ? "yes" : "NO  <-- FAIL",
                st.message.c_str());
    if (st.ok) ++failures;
    CUDA_OK(cudaStreamSynchronize(stream));
    cudaFree(d_a);
    cudaFree(d_b);
    cudaFree(d_ws);
    cudaFree(d_out);
    cudaFree(d_alpha);
  }

  CUDA_OK(cudaStreamDestroy(stream));
  std::printf("\n%s: %d failure(s)\n", failures ? "FAILED" : "ALL PASSED", failures);
  return failures ? 1 : 0;
}
