// Kernel switches, read from the environment once (at the first convolution)
// into one record that the planner reads; tests and benchmarks change them
// through the q4conv::set_tuning op (q4conv.tuning() in Python) instead of
// the environment, whose later changes are not seen.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace q4conv {

// A path's switch: its measured rule, never, or wherever it can run.
enum class Switch : int { kRule = -1, kNever = 0, kAlways = 1 };

struct Tuning {
  // Q4CONV_PACKED_TAPS: few-channel convolutions (the RGB stem) through
  // packed filter taps (rule: wherever they fit) or, with 0, the im2col GEMM.
  Switch packed_taps = Switch::kRule;
  // Q4CONV_FUSED_POINTWISE: 1x1 layers through the fused mma.sync kernel.
  Switch fused_pointwise = Switch::kRule;
  // Q4CONV_WGMMA_POINTWISE: 1x1 layers through the fused wgmma kernel.
  Switch wgmma_pointwise = Switch::kRule;
  // The sm90 tile configuration forced wherever it takes a shape (an index of
  // sm90_int8_config_names(), set by name through q4conv.tuning(sm90_config=...)),
  // -1 for the tile rule. For benchmarks and tests; no environment variable.
  int sm90_config = -1;
  // Bumped on every change: plans made under other switches are not reused.
  uint64_t epoch = 0;
};

// The current switches (a copy: cheap, and consistent under concurrent sets).
Tuning current_tuning();
// Sets switch `name` ("packed_taps", "fused_pointwise", "wgmma_pointwise") to
// -1 (rule), 0 (never) or 1 (always), or "sm90_config" to a configuration
// index (-1: the rule); returns its previous value.
int64_t set_tuning(const std::string& name, int64_t value);
// "packed_taps=-1,fused_pointwise=-1,wgmma_pointwise=-1,sm90_config=-1".
std::string describe_tuning();
// Hands the switches the kernels read themselves (sm90_config) to them:
// plan_cuda.cpp, a no-op in CPU-only builds.
void apply_kernel_tuning(const Tuning& tuning);
// The sm90 configurations' names in index order (empty in CPU-only builds).
std::vector<std::string> sm90_config_names();

}  // namespace q4conv
