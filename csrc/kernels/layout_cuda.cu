// Output layout of the CUDA convolutions (interface: conv_kernels.h). No torch
// here.
//
// The kernels write NHWC. For an NCHW input the layer returns NCHW, as
// nn.Conv2d does, and ATen's generic strided copy made that conversion the
// largest part of such a call (the stem: 399 us for its 103 MB fp16 output
// on H100, three times the convolution). This is a tiled transpose of each
// image's [P*Q, K] matrix through shared memory: coalesced reads along K and
// writes along P*Q.
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "conv_kernels.h"

namespace q4conv {
namespace {

constexpr int kTile = 32;     // a tile is kTile x kTile elements
constexpr int kTileRows = 8;  // threads per tile column: kTile x kTileRows threads
constexpr int kMaxGridZ = 65535;

// out[n, k, pixel] = in[n, pixel, k]; T is the element's bit pattern.
template <typename T>
__global__ void __launch_bounds__(kTile* kTileRows)
    nhwc_to_nchw_kernel(const T* __restrict__ in, int64_t images, int pixels, int channels,
                        T* __restrict__ out) {
  __shared__ T tile[kTile][kTile + 1];  // +1: the column reads hit distinct banks
  const int pixel0 = blockIdx.x * kTile, channel0 = blockIdx.y * kTile;
  const int64_t image_size = int64_t(pixels) * channels;
  for (int64_t n = blockIdx.z; n < images; n += gridDim.z) {
    const T* src = in + n * image_size;
    T* dst = out + n * image_size;
    for (int row = threadIdx.y; row < kTile; row += kTileRows) {
      const int pixel = pixel0 + row, channel = channel0 + threadIdx.x;
      if (pixel < pixels && channel < channels)
        tile[row][threadIdx.x] = src[int64_t(pixel) * channels + channel];
    }
    __syncthreads();
    for (int row = threadIdx.y; row < kTile; row += kTileRows) {
      const int channel = channel0 + row, pixel = pixel0 + threadIdx.x;
      if (pixel < pixels && channel < channels)
        dst[int64_t(channel) * pixels + pixel] = tile[threadIdx.x][row];
    }
    __syncthreads();  // the tile is refilled for the next image
  }
}

}  // namespace

KernelStatus nhwc_to_nchw(const void* in, int element_bytes, int64_t images, int64_t pixels,
                          int64_t channels, void* out, cudaStream_t stream) {
  const char* fn = "nhwc_to_nchw";
  if (element_bytes != 2 && element_bytes != 4)
    return KernelStatus::failure(std::string(fn) + ": invalid argument 'element_bytes': " +
                                 std::to_string(element_bytes) + " (must be 2 or 4)");
  if (images == 0 || pixels == 0 || channels == 0) return KernelStatus::success();
  if (in == nullptr || out == nullptr)
    return KernelStatus::failure(std::string(fn) + ": invalid argument 'in'/'out': null pointer");
  if (pixels > INT32_MAX || channels > INT32_MAX)
    return KernelStatus::failure(std::string(fn) +
                                 ": invalid argument 'pixels'/'channels': " + "more than 2^31 - 1");
  const dim3 grid(static_cast<unsigned>((pixels + kTile - 1) / kTile),
                  static_cast<unsigned>((channels + kTile - 1) / kTile),
                  static_cast<unsigned>(images < kMaxGridZ ? images : kMaxGridZ));
  if (grid.y > 65535)
    return KernelStatus::failure(std::string(fn) + ": invalid argument 'channels': " +
                                 std::to_string(channels) + " needs more than 65535 tile rows");
  const dim3 block(kTile, kTileRows);
  const int p = static_cast<int>(pixels), c = static_cast<int>(channels);
  if (element_bytes == 2)
    nhwc_to_nchw_kernel<uint16_t><<<grid, block, 0, stream>>>(
        static_cast<const uint16_t*>(in), images, p, c, static_cast<uint16_t*>(out));
  else
    nhwc_to_nchw_kernel<uint32_t><<<grid, block, 0, stream>>>(
        static_cast<const uint32_t*>(in), images, p, c, static_cast<uint32_t*>(out));
  return launch_status(fn);
}

}  // namespace q4conv
