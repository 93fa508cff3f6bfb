// The run-time -> compile-time type dispatch of csrc/kernels/element_types.h.
#include <gtest/gtest.h>

#include "kernels/element_types.h"

namespace q4conv {
namespace {

TEST(ElementTypes, WithOutTypePassesTheTypeAsATag) {
  for (OutType t : {OutType::kFloat32, OutType::kFloat16, OutType::kBFloat16}) {
    const OutType seen = with_out_type(
        t, [](auto tag) { return decltype(tag)::value; }, [] { return OutType::kFloat32; });
    EXPECT_EQ(seen, t);
  }
}

TEST(ElementTypes, TypesOutsideTheListTakeOtherwise) {
  using HalfOnly = TypeList<OutType::kFloat16>;
  const auto called = [](OutType t) {
    return with_out_type<HalfOnly>(
        t, [](auto) { return 1; }, [] { return 0; });
  };
  EXPECT_EQ(called(OutType::kFloat16), 1);
  EXPECT_EQ(called(OutType::kFloat32), 0);
  EXPECT_EQ(called(static_cast<OutType>(99)), 0);
}

TEST(ElementTypes, WithInTypeAndContains) {
  const int index = with_in_type(
      InType::kBFloat16, [](auto tag) { return static_cast<int>(decltype(tag)::value); },
      [] { return -1; });
  EXPECT_EQ(index, static_cast<int>(InType::kBFloat16));
  static_assert(AllInTypes::contains(InType::kFloat16), "");
  static_assert(!TypeList<InType::kFloat16>::contains(InType::kFloat32), "");
}

}  // namespace
}  // namespace q4conv
