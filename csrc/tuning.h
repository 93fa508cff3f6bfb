// Kernel switches, read from the environment once (at the first convolution)
// into one record that the planner reads; tests and benchmarks change them
// through the q4conv::set_tuning op (q4conv.tuning() in Python) instead of
// the environment, whose later changes are not seen.
#pragma once

#include <cstdint>
#include <string>

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
  // Bumped on every change: plans made under other switches are not reused.
  uint64_t epoch = 0;
};

// The current switches (a copy: cheap, and consistent under concurrent sets).
Tuning current_tuning();
// Sets switch `name` ("packed_taps", "fused_pointwise", "wgmma_pointwise") to
// -1 (rule), 0 (never) or 1 (always); returns its previous value.
int64_t set_tuning(const std::string& name, int64_t value);
// "packed_taps=-1,fused_pointwise=-1,wgmma_pointwise=-1".
std::string describe_tuning();

}  // namespace q4conv
