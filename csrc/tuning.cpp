// The tuning record: environment switches read once, changed by set_tuning.
#include "tuning.h"

#include <c10/util/Exception.h>

#include <array>
#include <atomic>
#include <cstdlib>
#include <mutex>

namespace q4conv {
namespace {

struct SwitchInfo {
  const char* name;
  const char* env;
};
constexpr std::array<SwitchInfo, 3> kSwitches{{{"packed_taps", "Q4CONV_PACKED_TAPS"},
                                               {"fused_pointwise", "Q4CONV_FUSED_POINTWISE"},
                                               {"wgmma_pointwise", "Q4CONV_WGMMA_POINTWISE"}}};

// Unset = the rule; "0" = never; anything else = wherever it can run (for
// packed taps, whose rule is "wherever it fits", the same as the rule).
Switch from_env(const char* env) {
  const char* value = std::getenv(env);
  if (value == nullptr) return Switch::kRule;
  return std::string(value) == "0" ? Switch::kNever : Switch::kAlways;
}

Switch& field(Tuning& t, size_t index) {
  switch (index) {
    case 0:
      return t.packed_taps;
    case 1:
      return t.fused_pointwise;
    default:
      return t.wgmma_pointwise;
  }
}

std::mutex& tuning_mutex() {
  static std::mutex mutex;
  return mutex;
}

Tuning& tuning_record() {  // guarded by tuning_mutex()
  static Tuning record = [] {
    Tuning t;
    for (size_t i = 0; i < kSwitches.size(); ++i) field(t, i) = from_env(kSwitches[i].env);
    return t;
  }();
  return record;
}

}  // namespace

Tuning current_tuning() {
  std::lock_guard<std::mutex> lock(tuning_mutex());
  return tuning_record();
}

int64_t set_tuning(const std::string& name, int64_t value) {
  std::lock_guard<std::mutex> lock(tuning_mutex());
  Tuning& t = tuning_record();
  if (name == "sm90_config") {
    const auto count = static_cast<int64_t>(sm90_config_names().size());
    TORCH_CHECK(value >= -1 && value < count, "set_tuning: sm90_config must be -1 (the rule) or a ",
                "configuration index below ", count, ", got ", value);
    const int64_t previous = t.sm90_config;
    t.sm90_config = static_cast<int>(value);
    ++t.epoch;
    apply_kernel_tuning(t);
    return previous;
  }
  TORCH_CHECK(value >= -1 && value <= 1, "set_tuning: value must be -1 (rule), 0 (never) or 1 ",
              "(always), got ", value);
  for (size_t i = 0; i < kSwitches.size(); ++i) {
    if (name != kSwitches[i].name) continue;
    const auto previous = static_cast<int64_t>(field(t, i));
    field(t, i) = static_cast<Switch>(value);
    ++t.epoch;
    return previous;
  }
  TORCH_CHECK(false, "set_tuning: name must be 'packed_taps', 'fused_pointwise', ",
              "'wgmma_pointwise' or 'sm90_config', got '", name, "'");
}

std::string describe_tuning() {
  Tuning t = current_tuning();  // a copy: field() needs a mutable record
  std::string text;
  for (size_t i = 0; i < kSwitches.size(); ++i) {
    text += std::string(i ? "," : "") + kSwitches[i].name + "=" +
            std::to_string(static_cast<int>(field(t, i)));
  }
  return text + ",sm90_config=" + std::to_string(t.sm90_config);
}

}  // namespace q4conv
