// Standalone check + timing harness of the sm90 int8 implicit-GEMM fprop
// (csrc/kernels/conv_sm90_int8*.cu). No torch, no gtest.
//
// For every shape: random codes in [-8, 7] (NHWC activations, KRSC weights),
// a naive GPU direct convolution gives the exact int32 sums, then the same
// epilogue in fp32 (fmaf(alpha, float(acc), bias), ReLU, final cast). The
// kernel output (poisoned with 0xFF bytes = NaN before every run) must match:
// fp32 exactly, fp16/bf16 within 1 ulp. Every output type and the bias/relu
// variants are checked; then the kernel is timed with CUDA events (warm-up,
// median of 25 samples, each the mean of 10 back-to-back calls of the public
// entry point, host set-up included), TOPS = 2*N*P*Q*K*C*R*S / time.
//
// Built by tests/cuda/CMakeLists.txt (sm_90a).
// Run: sm90_int8_check [--configs] [--no-time]
//   --configs  also checks and times every compiled tile configuration
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "kernels/conv_kernels.h"
#include "kernels/conv_sm90_int8.cuh"

using namespace q4conv;

#define CK(x)                                                                            \
  do {                                                                                   \
    cudaError_t e_ = (x);                                                                \
    if (e_ != cudaSuccess) {                                                             \
      std::fprintf(stderr, "CUDA error %s at %s:%d\n", cudaGetErrorString(e_), __FILE__, \
                   __LINE__);                                                            \
      std::exit(2);                                                                      \
    }                                                                                    \
  } while (0)

// ---------------------------------------------------------------- reference
__global__ void ref_conv(ConvShape s, const int8_t* act, const int8_t* wt, int32_t* acc) {
  long long total = 1LL * s.n * s.p * s.q * s.k;
  for (long long i = blockIdx.x * 1LL * blockDim.x + threadIdx.x; i < total;
       i += 1LL * gridDim.x * blockDim.x) {
    int k = static_cast<int>(i % s.k);
    long long t = i / s.k;
    int q = static_cast<int>(t % s.q);
    t /= s.q;
    int p = static_cast<int>(t % s.p);
    int n = static_cast<int>(t / s.p);
    int32_t sum = 0;
    for (int r = 0; r < s.r; ++r) {
      int h = p * s.stride_h - s.pad_h + r * s.dil_h;
      if (h < 0 || h >= s.h) continue;
      for (int ss = 0; ss < s.s; ++ss) {
        int w = q * s.stride_w - s.pad_w + ss * s.dil_w;
        if (w < 0 || w >= s.w) continue;
        const int8_t* a = act + ((1LL * n * s.h + h) * s.w + w) * s.c;
        const int8_t* b = wt + ((1LL * k * s.r + r) * s.s + ss) * s.c;
        for (int c = 0; c < s.c; ++c) sum += int32_t(a[c]) * int32_t(b[c]);
      }
    }
    acc[i] = sum;
  }
}

template <class T>
__device__ T cast_out(float v);
template <>
__device__ float cast_out<float>(float v) {
  return v;
}
template <>
__device__ __half cast_out<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __nv_bfloat16 cast_out<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

template <class T>
__global__ void ref_epilogue(long long total, int k, const int32_t* acc, const float* alpha,
                             const float* bias, bool relu, T* out) {
  for (long long i = blockIdx.x * 1LL * blockDim.x + threadIdx.x; i < total;
       i += 1LL * gridDim.x * blockDim.x) {
    int c = static_cast<int>(i % k);
    float v = fmaf(alpha[c], static_cast<float>(acc[i]), bias ? bias[c] : 0.0f);
    if (relu) v = fmaxf(v, 0.0f);
    out[i] = cast_out<T>(v);
  }
}

// ---------------------------------------------------------------- compare
static float h2f(uint16_t b, bool bf) {
  if (bf) {
    uint32_t u = uint32_t(b) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  __half_raw r;
  r.x = b;
  return __half2float(__half(r));
}
// monotone integer image of a 16-bit float, for ulp distance
static int ord16(uint16_t b) { return (b & 0x8000) ? -int(b & 0x7fff) : int(b); }

struct CmpResult {
  long long bad = 0;
  long long first = -1;
  double got = 0, want = 0;
};

static CmpResult compare(const std::vector<uint8_t>& got, const std::vector<uint8_t>& want,
                         OutType t, long long count) {
  CmpResult r;
  for (long long i = 0; i < count; ++i) {
    bool ok;
    double g, w;
    if (t == OutType::kFloat32) {
      float a, b;
      std::memcpy(&a, &got[i * 4], 4);
      std::memcpy(&b, &want[i * 4], 4);
      ok = (a == b);  // bit-exact up to the sign of zero; NaN (poison) fails
      g = a;
      w = b;
    } else {
      uint16_t a, b;
      std::memcpy(&a, &got[i * 2], 2);
      std::memcpy(&b, &want[i * 2], 2);
      bool bf = (t == OutType::kBFloat16);
      g = h2f(a, bf);
      w = h2f(b, bf);
      ok = !std::isnan(g) && !std::isnan(w) && std::abs(ord16(a) - ord16(b)) <= 1;
    }
    if (!ok) {
      if (r.bad == 0) {
        r.first = i;
        r.got = g;
        r.want = w;
      }
      ++r.bad;
    }
  }
  return r;
}

static const char* tname(OutType t) {
  return t == OutType::kFloat32 ? "f32" : t == OutType::kFloat16 ? "f16" : "bf16";
}
static size_t tsize(OutType t) { return t == OutType::kFloat32 ? 4 : 2; }

// ---------------------------------------------------------------- shapes
struct Case {
  std::string name;
  ConvShape s;
  bool resnet;
};

static ConvShape make(int n, int h, int w, int c, int k, int r, int s, int pad, int stride,
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
  x.p = (h + 2 * pad - ((r - 1) * dil + 1)) / stride + 1;
  x.q = (w + 2 * pad - ((s - 1) * dil + 1)) / stride + 1;
  return x;
}

static std::vector<Case> cases() {
  std::vector<Case> v;
  v.push_back({"odd c16k8 3x3 s2 d2 7x9 n1", make(1, 7, 9, 16, 8, 3, 3, 1, 2, 2), false});
  v.push_back({"odd c32k40 3x3 p1 11x13 n2", make(2, 11, 13, 32, 40, 3, 3, 1, 1, 1), false});
  v.push_back({"odd c144k72 1x1 s2 9x10 n3", make(3, 9, 10, 144, 72, 1, 1, 0, 2, 1), false});
  v.push_back({"odd c48k12 5x5 p2 6x6 n2", make(2, 6, 6, 48, 12, 5, 5, 2, 1, 1), false});
  v.push_back({"odd c256k136 3x3 p1 s2 15x15 n5", make(5, 15, 15, 256, 136, 3, 3, 1, 2, 1), false});
  v.push_back({"odd gemm c48k72 1x1 5x7 n3", make(3, 5, 7, 48, 72, 1, 1, 0, 1, 1), false});
  v.push_back({"odd gemm c528k264 1x1 9x11 n7", make(7, 9, 11, 528, 264, 1, 1, 0, 1, 1), false});
  const int rn[][5] = {{64, 64, 56, 1, 1},    {64, 64, 56, 3, 1},   {64, 256, 56, 1, 1},
                       {256, 64, 56, 1, 1},   {128, 128, 28, 3, 1}, {128, 512, 28, 1, 1},
                       {512, 128, 28, 1, 1},  {256, 256, 14, 3, 1}, {256, 1024, 14, 1, 1},
                       {1024, 256, 14, 1, 1}, {512, 512, 7, 3, 1},  {512, 2048, 7, 1, 1},
                       {2048, 512, 7, 1, 1},  {256, 512, 56, 1, 2}, {128, 128, 56, 3, 2}};
  for (auto& x : rn) {
    int c = x[0], k = x[1], h = x[2], r = x[3], st = x[4];
    int pad = r == 3 ? 1 : 0;
    char buf[96];
    std::snprintf(buf, sizeof buf, "rn50 c%d k%d h%d %dx%d s%d", c, k, h, r, r, st);
    v.push_back({buf, make(64, h, h, c, k, r, r, pad, st, 1), true});
  }
  return v;
}

// ---------------------------------------------------------------- runner
using RunFn = KernelStatus (*)(const ConvShape&, const void*, const void*, const EpilogueArgs&,
                               void*, cudaStream_t);

struct Buffers {
  int8_t *act = nullptr, *wt = nullptr;
  int32_t* acc = nullptr;
  float *alpha = nullptr, *bias = nullptr;
  void *out = nullptr, *ref = nullptr, *ws = nullptr;
  size_t ws_bytes = 0;
};

static long long g_failures = 0;

// Checks one (run function, out type, bias, relu); returns true when equal.
static bool check_one(const Case& cs, RunFn run, size_t ws_need, Buffers& b, OutType t,
                      bool use_bias, bool relu, const char* label) {
  const ConvShape& s = cs.s;
  long long cnt = 1LL * s.n * s.p * s.q * s.k;
  size_t bytes = cnt * tsize(t);
  // reference
  int blocks = static_cast<int>(std::min<long long>((cnt + 255) / 256, 65535));
  const float* bias = use_bias ? b.bias : nullptr;
  if (t == OutType::kFloat32)
    ref_epilogue<float><<<blocks, 256>>>(cnt, s.k, b.acc, b.alpha, bias, relu, (float*)b.ref);
  else if (t == OutType::kFloat16)
    ref_epilogue<__half><<<blocks, 256>>>(cnt, s.k, b.acc, b.alpha, bias, relu, (__half*)b.ref);
  else
    ref_epilogue<__nv_bfloat16>
        <<<blocks, 256>>>(cnt, s.k, b.acc, b.alpha, bias, relu, (__nv_bfloat16*)b.ref);
  CK(cudaGetLastError());
  CK(cudaMemset(b.out, 0xFF, bytes));  // poison
  if (ws_need > b.ws_bytes) {
    std::printf("  %-18s %-4s bias=%d relu=%d  FAIL workspace %zu > %zu\n", label, tname(t),
                use_bias, relu, ws_need, b.ws_bytes);
    ++g_failures;
    return false;
  }
  EpilogueArgs e;
  e.alpha = b.alpha;
  e.bias = bias;
  e.relu = relu;
  e.out_type = t;
  e.out = b.out;
  KernelStatus st = run(s, b.act, b.wt, e, b.ws, 0);
  cudaError_t ce = cudaDeviceSynchronize();
  if (!st.ok || ce != cudaSuccess) {
    std::printf("  %-18s %-4s bias=%d relu=%d  FAIL status: %s %s\n", label, tname(t), use_bias,
                relu, st.message.c_str(), cudaGetErrorString(ce));
    ++g_failures;
    if (ce != cudaSuccess) std::exit(3);  // sticky error: nothing else can run
    return false;
  }
  std::vector<uint8_t> got(bytes), want(bytes);
  CK(cudaMemcpy(got.data(), b.out, bytes, cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(want.data(), b.ref, bytes, cudaMemcpyDeviceToHost));
  CmpResult r = compare(got, want, t, cnt);
  if (r.bad) {
    std::printf(
        "  %-18s %-4s bias=%d relu=%d  FAIL %lld/%lld mismatches, first at %lld: got %.8g want "
        "%.8g\n",
        label, tname(t), use_bias, relu, r.bad, cnt, r.first, r.got, r.want);
    ++g_failures;
    return false;
  }
  return true;
}

// Median per-call time in ms: 25 samples, each the mean of 10 back-to-back
// calls. graph=false: the public call path (host set-up included, hidden
// when the GPU is the bottleneck); graph=true: the 10 calls captured once
// into a CUDA graph, so only the kernels are timed.
static double time_one(const Case& cs, RunFn run, Buffers& b, OutType t, bool graph) {
  EpilogueArgs e;
  e.alpha = b.alpha;
  e.bias = b.bias;
  e.relu = true;
  e.out_type = t;
  e.out = b.out;
  cudaStream_t st;
  CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
  for (int i = 0; i < 5; ++i) run(cs.s, b.act, b.wt, e, b.ws, st);
  CK(cudaStreamSynchronize(st));
  const int inner = 10;
  cudaGraphExec_t exec = nullptr;
  if (graph) {
    cudaGraph_t g;
    CK(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal));
    for (int i = 0; i < inner; ++i) run(cs.s, b.act, b.wt, e, b.ws, st);
    CK(cudaStreamEndCapture(st, &g));
    CK(cudaGraphInstantiate(&exec, g, 0));
    CK(cudaGraphDestroy(g));
    CK(cudaGraphLaunch(exec, st));
    CK(cudaStreamSynchronize(st));
  }
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  std::vector<float> ms;
  for (int it = 0; it < 25; ++it) {
    CK(cudaEventRecord(e0, st));
    if (graph)
      CK(cudaGraphLaunch(exec, st));
    else
      for (int i = 0; i < inner; ++i) run(cs.s, b.act, b.wt, e, b.ws, st);
    CK(cudaEventRecord(e1, st));
    CK(cudaEventSynchronize(e1));
    float m;
    CK(cudaEventElapsedTime(&m, e0, e1));
    ms.push_back(m / inner);
  }
  CK(cudaEventDestroy(e0));
  CK(cudaEventDestroy(e1));
  if (exec) CK(cudaGraphExecDestroy(exec));
  CK(cudaStreamDestroy(st));
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

static double ops(const ConvShape& s) {
  return 2.0 * s.n * s.p * s.q * s.k * double(s.c) * s.r * s.s;
}

int main(int argc, char** argv) {
  bool all_cfgs = false, do_time = true;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--configs")) all_cfgs = true;
    if (!std::strcmp(argv[i], "--no-time")) do_time = false;
  }
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s (sm_%d%d, %d SMs)\n", prop.name, prop.major, prop.minor,
              prop.multiProcessorCount);
  for (int i = 0; i < sm90::num_configs(); ++i) {
    const auto& c = sm90::config(i);
    std::printf("config %d: %-18s smem f32/f16/bf16 = %d/%d/%d B, built for %d CTA/SM\n", i, c.name,
                c.smem_bytes(OutType::kFloat32), c.smem_bytes(OutType::kFloat16),
                c.smem_bytes(OutType::kBFloat16), c.min_blocks());
  }

  std::mt19937 rng(1234);
  std::vector<std::string> table;
  for (const Case& cs : cases()) {
    const ConvShape& s = cs.s;
    std::printf("== %s: n=%d h=%d w=%d c=%d k=%d r=%d s=%d p=%d q=%d pad=%d stride=%d dil=%d\n",
                cs.name.c_str(), s.n, s.h, s.w, s.c, s.k, s.r, s.s, s.p, s.q, s.pad_h, s.stride_h,
                s.dil_h);
    size_t na = 1ULL * s.n * s.h * s.w * s.c, nw = 1ULL * s.k * s.r * s.s * s.c;
    long long cnt = 1LL * s.n * s.p * s.q * s.k;
    std::vector<int8_t> ha(na), hw(nw);
    std::uniform_int_distribution<int> code(-8, 7);
    for (auto& x : ha) x = static_cast<int8_t>(code(rng));
    for (auto& x : hw) x = static_cast<int8_t>(code(rng));
    std::vector<float> halpha(s.k), hbias(s.k);
    std::uniform_real_distribution<float> ua(0.25f, 2.0f), ub(-4.0f, 4.0f);
    float scale = 8.0f / std::sqrt(float(s.c) * s.r * s.s) / 20.0f;  // outputs of order 1..10
    for (int i = 0; i < s.k; ++i) {
      halpha[i] = ua(rng) * scale;
      hbias[i] = ub(rng);
    }
    Buffers b;
    CK(cudaMalloc(&b.act, na));
    CK(cudaMalloc(&b.wt, nw));
    CK(cudaMalloc(&b.acc, cnt * 4));
    CK(cudaMalloc(&b.alpha, s.k * 4));
    CK(cudaMalloc(&b.bias, s.k * 4));
    CK(cudaMalloc(&b.out, cnt * 4));
    CK(cudaMalloc(&b.ref, cnt * 4));
    CK(cudaMemcpy(b.act, ha.data(), na, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(b.wt, hw.data(), nw, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(b.alpha, halpha.data(), s.k * 4, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(b.bias, hbias.data(), s.k * 4, cudaMemcpyHostToDevice));
    ref_conv<<<static_cast<int>(std::min<long long>((cnt + 255) / 256, 1 << 20)), 256>>>(
        s, b.act, b.wt, b.acc);
    CK(cudaGetLastError());
    CK(cudaDeviceSynchronize());
    // workspace: the most any configuration asks for
    size_t ws = 0;
    for (OutType t : {OutType::kFloat32, OutType::kFloat16, OutType::kBFloat16}) {
      ws = std::max(ws, sm90_int8_workspace_bytes(s, t));
      for (int i = 0; i < sm90::num_configs(); ++i)
        ws = std::max(ws, sm90::config(i).workspace(s, t));
    }
    b.ws_bytes = ws;
    if (ws) CK(cudaMalloc(&b.ws, ws));

    // 1) public entry point: every out type; bias/relu variants
    const bool variants[4][2] = {{true, true}, {false, false}, {true, false}, {false, true}};
    int pass = 0, tried = 0;
    for (OutType t : {OutType::kFloat32, OutType::kFloat16, OutType::kBFloat16}) {
      bool sup = sm90_int8_supports(s, t);
      int pick = sm90::pick_config(s, t);
      if (!sup) {
        std::printf("  dispatch %-4s unsupported (caller falls back)\n", tname(t));
        continue;
      }
      std::printf("  dispatch %-4s -> %s\n", tname(t), sm90::config(pick).name);
      int nv = cs.resnet ? 2 : 4;
      for (int v = 0; v < nv; ++v) {
        int vv = cs.resnet ? (t == OutType::kFloat32 ? v : (v + 2) % 4) : v;
        ++tried;
        pass += check_one(cs, &sm90_int8_conv, sm90_int8_workspace_bytes(s, t), b, t,
                          variants[vv][0], variants[vv][1], "dispatch");
      }
    }
    std::printf("  dispatch correctness: %d/%d variants exact\n", pass, tried);

    // 2) every configuration (fp16, bias+relu), correctness and time
    double best_ms = 1e30;
    std::string best_name;
    std::string per_cfg;
    if (all_cfgs) {
      for (int i = 0; i < sm90::num_configs(); ++i) {
        const auto& c = sm90::config(i);
        if (!c.supports(s, OutType::kFloat16)) {
          std::printf("  cfg %-18s unsupported\n", c.name);
          continue;
        }
        bool ok = check_one(cs, c.run, c.workspace(s, OutType::kFloat16), b, OutType::kFloat16,
                            true, true, c.name);
        if (ok && do_time) {
          double ms = time_one(cs, c.run, b, OutType::kFloat16, true);
          std::printf("  cfg %-18s ok  %9.4f ms  %7.1f TOPS\n", c.name, ms, ops(s) / ms * 1e-9);
          char buf[64];
          std::snprintf(buf, sizeof buf, " %s=%.1f", c.name, ops(s) / ms * 1e-9);
          per_cfg += buf;
          if (ms < best_ms) {
            best_ms = ms;
            best_name = c.name;
          }
        } else if (ok) {
          std::printf("  cfg %-18s ok\n", c.name);
        }
      }
    }
    // 3) time the public entry point (kernel only via graph, and call path)
    if (do_time && sm90_int8_supports(s, OutType::kFloat16)) {
      double ms = time_one(cs, &sm90_int8_conv, b, OutType::kFloat16, true);
      double ms_call = time_one(cs, &sm90_int8_conv, b, OutType::kFloat16, false);
      const char* pick = sm90::config(sm90::pick_config(s, OutType::kFloat16)).name;
      double ms32 = sm90_int8_supports(s, OutType::kFloat32)
                        ? time_one(cs, &sm90_int8_conv, b, OutType::kFloat32, true)
                        : 0.0;
      std::printf(
          "  TIME dispatch f16 %s: kernel %.4f ms %.1f TOPS; call path %.4f ms; f32 out kernel "
          "%.4f ms\n",
          pick, ms, ops(s) / ms * 1e-9, ms_call, ms32);
      char buf[768];
      std::snprintf(buf, sizeof buf, "%-34s | %-20s | %8.4f | %7.1f | %8.4f | %8.4f |%s%s%s",
                    cs.name.c_str(), pick, ms, ops(s) / ms * 1e-9, ms_call, ms32,
                    all_cfgs ? " best=" : "", all_cfgs ? best_name.c_str() : "", per_cfg.c_str());
      table.push_back(buf);
    }
    cudaFree(b.act);
    cudaFree(b.wt);
    cudaFree(b.acc);
    cudaFree(b.alpha);
    cudaFree(b.bias);
    cudaFree(b.out);
    cudaFree(b.ref);
    if (b.ws) cudaFree(b.ws);
  }
  std::printf(
      "\nshape | config (f16) | kernel ms f16 | TOPS f16 | call-path ms f16 | kernel ms f32 | "
      "per-config TOPS (f16, kernel)\n");
  for (auto& l : table) std::printf("%s\n", l.c_str());
  std::printf("\n%s: %lld failures\n", g_failures ? "FAILED" : "ALL PASSED", g_failures);
  return g_failures ? 1 : 0;
}
