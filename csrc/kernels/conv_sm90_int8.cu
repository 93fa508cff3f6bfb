// Hopper (sm_90a) W4A4 convolution fast path: CUTLASS 3.x implicit-GEMM
// fprop (im2col TMA + wgmma, int8 x int8 -> int32) with a fused per-channel
// scale / bias / ReLU epilogue. The 4-bit codes in [-8, 7] are stored one per
// int8. This file holds the table of compiled tile configurations (one .cu
// file each, conv_sm90_int8_t*.cu, so they compile in parallel), the per-shape
// choice and the public entry points declared in conv_kernels.h.
//
// Tile choice (measured on H100 SXM, 132 SMs; the measurements are in docs/notes/):
//  * 1x1 stride-1 convolutions are GEMMs on the NHWC tensors and use the
//    persistent GEMM kernels (pingpong / cooperative, two consumer warp
//    groups, epilogue overlapped), 1.3-1.7x faster than the conv kernel;
//  * CUTLASS builds sm90 convs only on the non-persistent warp-specialized
//    kernel (one producer warp group, one consumer warp group); the
//    accumulators of a 128x256 tile (256 int32 per thread) do not fit the
//    registers, so the largest usable tile is 128x128. Where a layer has at
//    least a wave of 128x128 tiles, its im2col mainloop runs on the
//    persistent pingpong GEMM kernel instead (PersistentConvMainloop in
//    conv_sm90_int8_persistent.cuh, file conv_sm90_int8_c128x128x128pp.cu): 1.32-1.40x
//    the TOPS on the C128 / C256 3x3 layers;
//  * the reduction tile must not exceed C: the im2col TMA walks (C, S, R) and
//    a 128-deep tile on C == 64 loads half zeros, so C == 64 uses TK = 64;
//  * small N*P*Q (14x14 and 7x7 layers) leaves too few 128x128 tiles for the
//    SMs: 64x128 (and 128x64 for K == 64) tiles built for two CTAs per SM
//    raise occupancy and overlap one CTA's epilogue with another's mainloop.
#include <atomic>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "kernels/conv_sm90_int8.cuh"

namespace q4conv {
namespace sm90 {

namespace {
const Entry* const kTable[] = {
    &kCfg128x128x128,     &kCfg128x128x128_e128,   &kCfg128x64x128_2cta,   &kCfg128x64x64_2cta_e64,
    &kCfg64x128x128_2cta, &kCfg64x128x64_2cta,     &kGemm256x128x128_coop, &kGemm128x128x128_pp,
    &kConv128x128x128_pp, &kCfg128x64x32_2cta_e64,
};
constexpr int kNum = sizeof(kTable) / sizeof(kTable[0]);

// A wave of 128x128 tiles for the persistent pingpong conv: 4 tiles short of
// one per SM (128 on a 132-SM H100 SXM, where the rule was measured; 110 on
// a 114-SM H100 PCIe); 128 where the SM count is unknown.
long long wave_tiles(int sm_count) { return sm_count > 0 ? sm_count - 4 : 128; }

// Preferred configuration for a shape (before checking it can run it) on a
// device of sm_count SMs. Measured per shape on H100 SXM; the rules below
// pick the best or within ~2% of it for every ResNet-50 layer.
// Codes out (conv_fused's int8 epilogue) on a pointwise GEMM with K > 64: the
// 256x128 cooperative kernel beat the 128x128 pingpong one by 1.11-1.58x on
// the ResNet-50 layers with C <= 512 or K <= 256 (bench/sweep_sm90_configs.py,
// H200; docs/notes/sm90-implicit-gemm-tiles.md), except where its tiles cover
// under half the SMs (C2048 K512 7x7: 1.48x slower); C1024 K512 stays pingpong
// (6% faster there). The float outputs keep the rule below, measured on them.
bool codes_out_prefers_coop(const ConvShape& s, int sm_count) {
  const long long coop_tiles = (1LL * s.n * s.p * s.q + 255) / 256 * ((s.k + 127) / 128);
  const long long half_sms = sm_count > 0 ? sm_count / 2 : 66;
  return coop_tiles >= half_sms && (s.c <= 512 || s.k <= 256);
}

const Entry* preferred(const ConvShape& s, int sm_count, OutType out_type) {
  long long red = 1LL * s.c * s.r * s.s;
  bool small_c = s.c < 128;  // C == 64 (or 16, 32, 48, 80, ...): 64-deep tiles
  bool gemm = is_pointwise_gemm(s);
  // K <= 64: 128x64 conv tiles, two CTAs per SM (beat the GEMMs there too)
  // (C <= 32, few-channel convolutions with their filter taps packed into
  // 16 or 32 channels: 32-deep tiles. H100, the stem packed into 32
  // channels: 187 us against 264 with the 64-deep tiles and 424 on the
  // persistent pingpong kernel. The stem now packs two rows into 64
  // channels and takes the 128x64x64 tiles.)
  if (s.k <= 64 && s.c <= 32 && !gemm) return &kCfg128x64x32_2cta_e64;
  if (s.k <= 64) return small_c ? &kCfg128x64x64_2cta_e64 : &kCfg128x64x128_2cta;
  if (gemm) {
    if (out_type == OutType::kFusedCodes8 && codes_out_prefers_coop(s, sm_count))
      return &kGemm256x128x128_coop;
    // output-bound (short reduction, wide output): 256x128 cooperative;
    // otherwise 128x128 pingpong
    if (s.c <= 128 && s.k >= 256) return &kGemm256x128x128_coop;
    return &kGemm128x128x128_pp;
  }
  if (small_c) return &kCfg64x128x64_2cta;
  if (red >= 4096) return &kCfg128x128x128;  // 7x7 3x3: long reduction
  // At least a wave of 128x128 tiles: the persistent pingpong conv (H100:
  // 1.32-1.40x the TOPS of the non-persistent 128x128 kernel on
  // the C128 / C256 3x3 layers; C512 3x3 7x7 gained 1.05-1.15x in the
  // kernel but not in the layer, so it keeps the kernel above).
  const long long tiles = (1LL * s.n * s.p * s.q + 127) / 128 * ((s.k + 127) / 128);
  if (tiles >= wave_tiles(sm_count)) return &kConv128x128x128_pp;
  if (red >= 1152) return &kCfg128x128x128_e128;  // 3x3 layers
  return &kCfg64x128x128_2cta;                    // 1x1 stride 2 etc.
}
}  // namespace

int num_configs() { return kNum; }
const Entry& config(int i) { return *kTable[i]; }

namespace {

// The configuration a benchmark forces (sm90_int8_force_config), -1 for the rule.
std::atomic<int> g_forced{-1};

int pick_config_uncached(const ConvShape& shape, OutType out_type, int sm_count, int forced) {
  if (forced >= 0 && forced < kNum && kTable[forced]->supports(shape, out_type)) return forced;
  const Entry* want = preferred(shape, sm_count, out_type);
  for (int i = 0; i < kNum; ++i)
    if (kTable[i] == want && want->supports(shape, out_type)) return i;
  // Fallback order: the table order (general configurations first).
  for (int i = 0; i < kNum; ++i)
    if (kTable[i]->supports(shape, out_type)) return i;
  return -1;
}

}  // namespace

// The choice runs CUTLASS can_implement checks (tens of microseconds of host
// work) and is asked for up to three times per forward call (dispatch,
// workspace size, launch): remember it, and the configuration's workspace
// size, per (shape, output type, SM count).
struct Choice {
  int config = -1;
  size_t workspace = 0;
};

Choice choose(const ConvShape& shape, OutType out_type) {
  using Key = std::tuple<std::string, int, int, int>;
  static std::mutex mutex;
  static std::map<Key, Choice> chosen;
  const int sm_count = current_sm_count();
  const int forced = g_forced.load(std::memory_order_relaxed);
  const Key key{std::string(reinterpret_cast<const char*>(&shape), sizeof shape),
                static_cast<int>(out_type), sm_count, forced};
  {
    std::lock_guard<std::mutex> lock(mutex);
    const auto found = chosen.find(key);
    if (found != chosen.end()) return found->second;
  }
  Choice choice;
  choice.config = pick_config_uncached(shape, out_type, sm_count, forced);
  if (choice.config >= 0) choice.workspace = config(choice.config).workspace(shape, out_type);
  std::lock_guard<std::mutex> lock(mutex);
  if (chosen.size() > 4096) chosen.clear();  // bound memory for shape-varying workloads
  chosen.emplace(key, choice);
  return choice;
}

int pick_config(const ConvShape& shape, OutType out_type) { return choose(shape, out_type).config; }

int current_sm_count(int* device_out) {
  static std::atomic<int> cached[kMaxDevices];
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) {
    cudaGetLastError();
    device = 0;
  }
  if (device_out != nullptr) *device_out = device;
  const bool known = device >= 0 && device < kMaxDevices;
  int count = known ? cached[device].load(std::memory_order_relaxed) : 0;
  if (count > 0) return count;
  if (cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  if (known) cached[device].store(count, std::memory_order_relaxed);
  return count;
}

}  // namespace sm90

bool sm90_int8_supports(const ConvShape& shape, OutType out_type) {
  return sm90::pick_config(shape, out_type) >= 0;
}

size_t sm90_int8_workspace_bytes(const ConvShape& shape, OutType out_type) {
  return sm90::choose(shape, out_type).workspace;
}

std::vector<std::string> sm90_int8_config_names() {
  std::vector<std::string> names;
  for (int i = 0; i < sm90::num_configs(); ++i) names.emplace_back(sm90::config(i).name);
  return names;
}

void sm90_int8_force_config(int index) {
  sm90::g_forced.store(index >= 0 && index < sm90::num_configs() ? index : -1,
                       std::memory_order_relaxed);
}

const char* sm90_int8_config_name(const ConvShape& shape, OutType out_type) {
  const int i = sm90::pick_config(shape, out_type);
  return i < 0 ? "" : sm90::config(i).name;
}

KernelStatus sm90_int8_conv(const ConvShape& shape, const void* act, const void* weight,
                            const EpilogueArgs& epilogue, void* workspace, cudaStream_t stream) {
  int i = sm90::pick_config(shape, epilogue.out_type);
  if (i < 0)
    return KernelStatus::failure("sm90_int8_conv: shape not supported by any sm90 configuration");
  return sm90::config(i).run(shape, act, weight, epilogue, workspace, stream);
}

}  // namespace q4conv
