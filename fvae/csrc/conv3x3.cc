// 3x3, stride-1, 'SAME' convolutions in NHWC layout (float32) for the CPU, as XLA FFI
// custom calls; fvae.cpu_kernels compiles and registers them. Two kernels:
//
//   FvaeConv3x3:           y[n, h, w, o] = sum_{kh, kw, i} x[n, h + kh - 1, w + kw - 1, i]
//                                                          * k[kh, kw, i, o]
//   FvaeConv3x3WeightGrad: dk[g, kh, kw, i, o] = sum_{b, h, w} x[g, b, h + kh - 1, w + kw - 1, i]
//                                                              * dy[g, b, h, w, o]
//
// with x zero outside the image. n and g run over every leading dimension. The weight
// gradient gets the batch in groups of a few images and returns one partial sum per
// group, which XLA adds up: the result does not depend on the number of threads.
//
// Why: XLA:CPU (jaxlib 0.10) runs these convolutions' gradients at a third to a half of
// the machine's peak. Here each output tile stays in registers while it sweeps inputs
// that stay in L1 cache. GCC's vector extensions make the code AVX-512 when compiled for
// such a host (-march=native) and plain SIMD elsewhere.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <functional>
#include <initializer_list>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kLanes = 16;
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));

inline Vec Load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void Store(float* p, Vec v) { std::memcpy(p, &v, sizeof(v)); }

// Calls body(i) for every i in [0, n), each exactly once, on this thread and on up to
// pool.num_threads() - 1 pool tasks. The state is owned jointly, so a task that starts
// after the work is done finds nothing left to claim and touches nothing of the caller.
void ParallelFor(ffi::ThreadPool& pool, int64_t n, std::function<void(int64_t)> body) {
  struct State {
    std::function<void(int64_t)> body;
    int64_t n;
    std::atomic<int64_t> next{0}, done{0};
    void Run() {
      for (int64_t i; (i = next.fetch_add(1)) < n;) {
        body(i);
        done.fetch_add(1, std::memory_order_release);
      }
    }
  };
  auto state = std::make_shared<State>();
  state->body = std::move(body);
  state->n = n;
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), n) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([state] { state->Run(); });
  state->Run();
  while (state->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

struct Image {
  int64_t height, width, channels;
};

using Dims = ffi::Span<const int64_t>;

// The number of items the buffers hold: the product of the dimensions before their last
// `trailing` ones, which every buffer must have alike; -1 if they have not.
int64_t ItemCount(std::initializer_list<Dims> buffers, size_t trailing) {
  const Dims first = *buffers.begin();
  if (first.size() < trailing) return -1;
  int64_t count = 1;
  for (size_t i = 0; i + trailing < first.size(); ++i) {
    for (Dims dims : buffers)
      if (dims.size() != first.size() || dims[i] != first[i]) return -1;
    count *= first[i];
  }
  return count;
}

// ---------------------------------------------------------------------------------
// Convolution.

// Output pixels [w0, w0 + WB) of row h, channels [o0, o0 + NV * kLanes), from an image
// padded by one pixel on every side.
template <int WB, int NV>
void ConvTile(const Image& in, int64_t out_channels, const float* padded, const float* k,
              float* y, int64_t h, int64_t w0, int64_t o0) {
  const int64_t C = in.channels, O = out_channels, padded_width = in.width + 2;
  Vec acc[WB][NV] = {};
  for (int kh = 0; kh < 3; ++kh)
    for (int kw = 0; kw < 3; ++kw) {
      const float* xs = padded + ((h + kh) * padded_width + w0 + kw) * C;
      const float* ks = k + (kh * 3 + kw) * C * O + o0;
      for (int64_t c = 0; c < C; ++c) {
        Vec kv[NV];
        for (int j = 0; j < NV; ++j) kv[j] = Load(ks + c * O + j * kLanes);
        for (int i = 0; i < WB; ++i) {
          const Vec xi = Vec{} + xs[i * C + c];
          for (int j = 0; j < NV; ++j) acc[i][j] += xi * kv[j];
        }
      }
    }
  for (int i = 0; i < WB; ++i)
    for (int j = 0; j < NV; ++j) Store(y + (h * in.width + w0 + i) * O + o0 + j * kLanes, acc[i][j]);
}

template <int WB>
void ConvTiles(const Image& in, int64_t O, const float* padded, const float* k, float* y,
               int64_t h, int64_t w0) {
  int64_t o0 = 0;
  for (; o0 + 2 * kLanes <= O; o0 += 2 * kLanes) ConvTile<WB, 2>(in, O, padded, k, y, h, w0, o0);
  if (o0 < O) ConvTile<WB, 1>(in, O, padded, k, y, h, w0, o0);
}

// One image; out_channels % 16 == 0.
void ConvImage(const Image& in, int64_t O, const float* x, const float* k, float* y) {
  const int64_t C = in.channels, H = in.height, W = in.width;
  thread_local std::vector<float> padded;
  padded.assign((H + 2) * (W + 2) * C, 0.0f);
  for (int64_t h = 0; h < H; ++h)
    std::memcpy(&padded[((h + 1) * (W + 2) + 1) * C], x + h * W * C, W * C * sizeof(float));
  for (int64_t h = 0; h < H; ++h) {
    int64_t w0 = 0;
    for (; w0 + 14 <= W; w0 += 14) ConvTiles<14>(in, O, padded.data(), k, y, h, w0);
    for (; w0 + 7 <= W; w0 += 7) ConvTiles<7>(in, O, padded.data(), k, y, h, w0);
    for (; w0 < W; ++w0) ConvTiles<1>(in, O, padded.data(), k, y, h, w0);
  }
}

ffi::Error Conv3x3Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> k,
                       ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), kd = k.dimensions(), yd = y->dimensions();
  const int64_t images = ItemCount({xd, yd}, 3);
  if (images < 0 || kd.size() != 4)
    return ffi::Error::InvalidArgument(
        "conv3x3: x and y need the same rank >= 3 and batch dimensions, k rank 4");
  const size_t rank = xd.size();
  const Image in{xd[rank - 3], xd[rank - 2], xd[rank - 1]};
  const int64_t O = kd[3];
  if (kd[0] != 3 || kd[1] != 3 || kd[2] != in.channels || yd[rank - 3] != in.height ||
      yd[rank - 2] != in.width || yd[rank - 1] != O)
    return ffi::Error::InvalidArgument("conv3x3: shapes of x, k and y disagree");
  if (O % kLanes != 0)
    return ffi::Error::InvalidArgument("conv3x3: needs out_channels % 16 == 0");
  const float* xp = x.typed_data();
  const float* kp = k.typed_data();
  float* yp = y->typed_data();
  const int64_t x_size = in.height * in.width * in.channels, y_size = in.height * in.width * O;
  ParallelFor(pool, images, [&](int64_t n) { ConvImage(in, O, xp + n * x_size, kp, yp + n * y_size); });
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------
// Weight gradient.

// Adds tap (kh, kw)'s contribution of image rows [h0, h1) of one image to the
// CI x (NV * kLanes) block of dk at (i0, o0): rank-one updates whose accumulators
// stay in registers.
template <int CI, int NV>
void WeightGradTile(const Image& in, int64_t O, const float* x, const float* dy, float* dk,
                    int kh, int kw, int64_t i0, int64_t o0, int64_t h0, int64_t h1) {
  const int64_t C = in.channels, W = in.width;
  float* out = dk + ((kh * 3 + kw) * C + i0) * O + o0;
  Vec acc[CI][NV];
  for (int i = 0; i < CI; ++i)
    for (int j = 0; j < NV; ++j) acc[i][j] = Load(out + i * O + j * kLanes);
  const int64_t w_begin = kw == 0 ? 1 : 0, w_end = kw == 2 ? W - 1 : W;
  for (int64_t h = h0; h < h1; ++h) {
    const int64_t row = h + kh - 1;
    if (row < 0 || row >= in.height) continue;
    const float* x_row = x + (row * W + kw - 1) * C + i0;
    const float* dy_row = dy + h * W * O + o0;
    for (int64_t w = w_begin; w < w_end; ++w) {
      Vec g[NV];
      for (int j = 0; j < NV; ++j) g[j] = Load(dy_row + w * O + j * kLanes);
      const float* a = x_row + w * C;
      for (int i = 0; i < CI; ++i) {
        const Vec ai = Vec{} + a[i];
        for (int j = 0; j < NV; ++j) acc[i][j] += ai * g[j];
      }
    }
  }
  for (int i = 0; i < CI; ++i)
    for (int j = 0; j < NV; ++j) Store(out + i * O + j * kLanes, acc[i][j]);
}

template <int CI>
void WeightGradTiles(const Image& in, int64_t O, const float* x, const float* dy, float* dk,
                     int kh, int kw, int64_t i0, int64_t h0, int64_t h1) {
  int64_t o0 = 0;
  for (; o0 + 2 * kLanes <= O; o0 += 2 * kLanes)
    WeightGradTile<CI, 2>(in, O, x, dy, dk, kh, kw, i0, o0, h0, h1);
  if (o0 < O) WeightGradTile<CI, 1>(in, O, x, dy, dk, kh, kw, i0, o0, h0, h1);
}

// dk (3, 3, C, O) of a group of images; O % 16 == 0.
void WeightGradOfGroup(const Image& in, int64_t images, int64_t O, const float* x,
                       const float* dy, float* dk) {
  constexpr int kCi = 8, kRows = 4;  // 8 x 32 accumulators; a few rows fit in L1
  const int64_t C = in.channels, HW = in.height * in.width;
  std::fill(dk, dk + 9 * C * O, 0.0f);
  for (int64_t b = 0; b < images; ++b) {
    const float* xb = x + b * HW * C;
    const float* dyb = dy + b * HW * O;
    for (int64_t h0 = 0; h0 < in.height; h0 += kRows) {
      const int64_t h1 = std::min(h0 + kRows, in.height);
      for (int kh = 0; kh < 3; ++kh)
        for (int kw = 0; kw < 3; ++kw) {
          int64_t i0 = 0;
          for (; i0 + kCi <= C; i0 += kCi) WeightGradTiles<kCi>(in, O, xb, dyb, dk, kh, kw, i0, h0, h1);
          for (; i0 < C; ++i0) WeightGradTiles<1>(in, O, xb, dyb, dk, kh, kw, i0, h0, h1);
        }
    }
  }
}

ffi::Error Conv3x3WeightGradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                                 ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dk) {
  auto xd = x.dimensions(), dyd = dy.dimensions(), dkd = dk->dimensions();
  const int64_t groups = ItemCount({xd, dyd, dkd}, 4);
  if (groups < 0)
    return ffi::Error::InvalidArgument(
        "conv3x3_weight_grad: x, dy and dk need the same rank >= 4 and group dimensions");
  const size_t rank = xd.size();
  const Image in{xd[rank - 3], xd[rank - 2], xd[rank - 1]};
  const int64_t images = xd[rank - 4], O = dyd[rank - 1];
  if (dyd[rank - 4] != images || dyd[rank - 3] != in.height || dyd[rank - 2] != in.width ||
      dkd[rank - 4] != 3 || dkd[rank - 3] != 3 || dkd[rank - 2] != in.channels ||
      dkd[rank - 1] != O)
    return ffi::Error::InvalidArgument("conv3x3_weight_grad: shapes of x, dy and dk disagree");
  if (O % kLanes != 0)
    return ffi::Error::InvalidArgument("conv3x3_weight_grad: needs out_channels % 16 == 0");
  const float* xp = x.typed_data();
  const float* dyp = dy.typed_data();
  float* dkp = dk->typed_data();
  const int64_t x_size = images * in.height * in.width * in.channels;
  const int64_t dy_size = images * in.height * in.width * O, dk_size = 9 * in.channels * O;
  ParallelFor(pool, groups, [&](int64_t g) {
    WeightGradOfGroup(in, images, O, xp + g * x_size, dyp + g * dy_size, dkp + g * dk_size);
  });
  return ffi::Error::Success();
}

// Both handlers: XLA's thread pool, two float32 operands, one float32 result.
auto Binding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Ret<ffi::Buffer<ffi::F32>>();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FvaeConv3x3, Conv3x3Impl, Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(FvaeConv3x3WeightGrad, Conv3x3WeightGradImpl, Binding());
