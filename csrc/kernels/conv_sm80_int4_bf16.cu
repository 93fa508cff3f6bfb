// CUTLASS sm80 int4 fprop instantiation for OutType::kBFloat16 (see conv_sm80_int4_impl.cuh).
#define Q4CONV_SM80_INT4_DEFINE_KERNELS 1
#include "kernels/conv_sm80_int4_impl.cuh"

namespace q4conv {
namespace sm80_int4_detail {
Q4CONV_SM80_INT4_INSTANTIATE(OutType::kBFloat16)
}  // namespace sm80_int4_detail
}  // namespace q4conv
