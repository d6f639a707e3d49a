// 3x3 convolutions in NHWC layout (float32) for the CPU, as XLA FFI custom calls;
// fvae/cpu/kernels.py compiles and registers them. With x zero outside the image:
//
//   FvaeConv3x3 (stride 1, 'SAME'):
//     y[n, h, w, o] = sum_{kh, kw, i} x[n, h + kh - 1, w + kw - 1, i] * k[kh, kw, i, o]
//   FvaeConv3x3WeightGrad:
//     dk[g, kh, kw, i, o] = sum_{b, h, w} x[g, b, h + kh - 1, w + kw - 1, i] * dy[g, b, h, w, o]
//
//   FvaeConvTranspose3x3s2 (stride 2, 'SAME', nn.ConvTranspose's convention): each
//   input pixel (h, w) adds x[h, w] * k[kh, kw] to output pixel (2h + 2 - kh, 2w + 2 - kw)
//     y[n, 2h + 2 - kh, 2w + 2 - kw, o] += x[n, h, w, i] * k[kh, kw, i, o]
//   FvaeConvTranspose3x3s2InputGrad, with kt = k transposed to (3, 3, O, I):
//     dx[n, h, w, i] = sum_{kh, kw, o} dy[n, 2h + 2 - kh, 2w + 2 - kw, o] * kt[kh, kw, o, i]
//   FvaeConvTranspose3x3s2WeightGrad:
//     dk[g, kh, kw, i, o] = sum_{b, h, w} x[g, b, h, w, i] * dy[g, b, 2h + 2 - kh, 2w + 2 - kw, o]
//
// n and g run over every leading dimension. The weight gradients get the batch in
// groups of a few images and return one partial sum per group, which XLA adds up: the
// result does not depend on the number of threads. The transposed convolution computes
// only the taps each output pixel uses (a quarter of its pixels use one, half two, a
// quarter four), where the equivalent ordinary 2x2 convolution would multiply zeros too.
//
// Why: XLA:CPU (jaxlib 0.10) runs these convolutions' gradients at a third to a half of
// the machine's peak. Here each output tile stays in registers while it sweeps inputs
// that stay in L1 cache. GCC's vector extensions make the code AVX-512, AVX2, NEON or SSE
// as the host is (-march=native), with register tiles set at compile time (FVAE_TILES).

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <functional>
#include <initializer_list>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Output tiles held in registers: kTileVectors vectors of output channels by
// kTilePixels pixels (convolutions) or by kTileInputs input channels (weight gradients).
// The accumulators, the kTileVectors operands of one step and a broadcast should fit
// the vector registers: a tile that spills runs at a fraction of the FMA units' rate.
// Which tile is fastest depends on the CPU, not just its instruction set (the tiles
// chosen on AMD lost on Intel), so fvae/cpu/kernels.py compiles one library per
// candidate tile set (-DFVAE_TILES=lanes,vectors,pixels,inputs) and times them against
// XLA for each layer (fvae/cpu/dispatch.py).
#ifndef FVAE_TILES
#error "compile with -DFVAE_TILES=lanes,vectors,pixels,inputs (fvae/cpu/kernels.py does)"
#endif
constexpr int kTiles[] = {FVAE_TILES};
constexpr int kLanes = kTiles[0], kTileVectors = kTiles[1], kTilePixels = kTiles[2],
              kTileInputs = kTiles[3];
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));

// Channel counts the kernels take come in multiples of this (fvae/cpu/kernels.py: LANES).
constexpr int kChannelMultiple = 16;
static_assert(kChannelMultiple % kLanes == 0, "a block of channels is whole vectors");

template <int N>
using Int = std::integral_constant<int, N>;

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

// ---------------------------------------------------------------------------------
// Micro-kernels: a tile of outputs in registers.

// acc[p][j] += sum_{c < C} x[p * x_stride + c] * k[c * k_stride + j * kLanes]: WB pixels
// of NV * kLanes output channels (the convolutions and the input gradient). Pixels
// before `first` and from `end` on are left alone (they would read outside the image).
template <int WB, int NV, int first = 0, int end = WB>
inline void AccumulatePixels(Vec (&acc)[WB][NV], const float* x, int64_t x_stride,
                             const float* k, int64_t k_stride, int64_t C) {
  for (int64_t c = 0; c < C; ++c) {
    Vec kv[NV];
    for (int j = 0; j < NV; ++j) kv[j] = Load(k + c * k_stride + j * kLanes);
    for (int p = first; p < end; ++p) {
      const Vec xp = Vec{} + x[p * x_stride + c];
      for (int j = 0; j < NV; ++j) acc[p][j] += xp * kv[j];
    }
  }
}

// AccumulatePixels for a tile whose first pixel (if skip_first) or last pixel (if
// skip_last) has its input outside the image: the image is read in place, not copied
// into a zero border.
template <int WB, int NV>
inline void AccumulateInside(Vec (&acc)[WB][NV], bool skip_first, bool skip_last,
                             const float* x, int64_t x_stride, const float* k,
                             int64_t k_stride, int64_t C) {
  if (skip_first)
    AccumulatePixels<WB, NV, 1, WB>(acc, x, x_stride, k, k_stride, C);
  else if (skip_last)
    AccumulatePixels<WB, NV, 0, WB - 1>(acc, x, x_stride, k, k_stride, C);
  else
    AccumulatePixels<WB, NV>(acc, x, x_stride, k, k_stride, C);
}

// Asks for the n floats at x to be brought into cache ahead of their use.
inline void Prefetch(const float* x, int64_t n) {
  for (int64_t i = 0; i < n; i += 64 / sizeof(float)) __builtin_prefetch(x + i);
}

// What a convolution does to its output before storing it: y = max(acc + bias[o] +
// residual[..., o], 0), where bias and residual are optional (null) and the ReLU is
// applied if `relu`. One pass over the output where XLA would make two or three.
struct Epilogue {
  const float* bias = nullptr;  // (O)
  const float* residual = nullptr;  // shaped like the output
  bool relu = false;
};

// Stores a tile of WB pixels (y_stride apart) by NV * kLanes channels from o0 on, after
// the epilogue; y and residual point at the tile's first pixel and channel o0.
template <int WB, int NV>
inline void StorePixels(const Vec (&acc)[WB][NV], float* y, int64_t y_stride,
                        const Epilogue& e = {}, const float* residual = nullptr,
                        int64_t o0 = 0) {
  for (int p = 0; p < WB; ++p)
    for (int j = 0; j < NV; ++j) {
      Vec v = acc[p][j];
      if (e.bias) v += Load(e.bias + o0 + j * kLanes);
      if (residual) v += Load(residual + p * y_stride + j * kLanes);
      if (e.relu) v = v < 0 ? Vec{} : v;  // NaN stays NaN, as in jnp.maximum(v, 0)
      Store(y + p * y_stride + j * kLanes, v);
    }
}

// Calls block(Int<NV>(), o0) for blocks of NV * kLanes channels that cover `channels`
// (a multiple of kLanes): kTileVectors vectors at a time, then one at a time.
template <class Block>
void ForEachChannelBlock(int64_t channels, const Block& block) {
  int64_t o0 = 0;
  for (; o0 + kTileVectors * kLanes <= channels; o0 += kTileVectors * kLanes)
    block(Int<kTileVectors>(), o0);
  for (; o0 < channels; o0 += kLanes) block(Int<1>(), o0);
}

// Calls tile(Int<WB>(), Int<NV>(), w0, o0) for tiles of WB pixels by NV * kLanes channels
// that cover a row of `width` pixels and `channels` channels (a multiple of kLanes).
template <class Tile>
void ForEachTile(int64_t width, int64_t channels, const Tile& tile) {
  auto row_part = [&](auto wb, int64_t w0) {
    ForEachChannelBlock(channels, [&](auto nv, int64_t o0) { tile(wb, nv, w0, o0); });
  };
  int64_t w0 = 0;
  for (; w0 + kTilePixels <= width; w0 += kTilePixels) row_part(Int<kTilePixels>(), w0);
  for (; w0 + kTilePixels / 2 <= width; w0 += kTilePixels / 2)
    row_part(Int<kTilePixels / 2>(), w0);
  for (; w0 < width; ++w0) row_part(Int<1>(), w0);
}

// A run of n pixels of one row of x paired with n pixels of dy, for a weight gradient.
struct Run {
  const float* x;  // channel 0 of the first x pixel
  const float* dy;  // channel 0 of the first dy pixel
  int64_t n;
};

// dk[i, o] += sum over runs and their pixels p of run.x[p * x_stride + i] *
// run.dy[p * dy_stride + o], for one kernel tap dk (C, O): rank-one updates of a
// CI x (NV * kLanes) tile held in registers.
template <int CI, int NV>
void WeightGradTile(const std::vector<Run>& runs, int64_t x_stride, int64_t dy_stride,
                    int64_t O, float* dk, int64_t i0, int64_t o0) {
  float* out = dk + i0 * O + o0;
  Vec acc[CI][NV];
  for (int i = 0; i < CI; ++i)
    for (int j = 0; j < NV; ++j) acc[i][j] = Load(out + i * O + j * kLanes);
  for (const Run& run : runs) {
    const float* a = run.x + i0;
    const float* g = run.dy + o0;
    for (int64_t p = 0; p < run.n; ++p) {
      Vec gv[NV];
      for (int j = 0; j < NV; ++j) gv[j] = Load(g + p * dy_stride + j * kLanes);
      for (int i = 0; i < CI; ++i) {
        const Vec ai = Vec{} + a[p * x_stride + i];
        for (int j = 0; j < NV; ++j) acc[i][j] += ai * gv[j];
      }
    }
  }
  for (int i = 0; i < CI; ++i)
    for (int j = 0; j < NV; ++j) Store(out + i * O + j * kLanes, acc[i][j]);
}

void AddWeightGrad(const std::vector<Run>& runs, int64_t x_stride, int64_t dy_stride,
                   int64_t C, int64_t O, float* dk) {
  auto in_channels = [&](auto ci, int64_t i0) {
    ForEachChannelBlock(O, [&](auto nv, int64_t o0) {
      WeightGradTile<decltype(ci)::value, decltype(nv)::value>(runs, x_stride, dy_stride, O,
                                                               dk, i0, o0);
    });
  };
  int64_t i0 = 0;
  for (; i0 + kTileInputs <= C; i0 += kTileInputs) in_channels(Int<kTileInputs>(), i0);
  for (; i0 < C; ++i0) in_channels(Int<1>(), i0);
}

constexpr int64_t kRowsPerBlock = 4;  // rows of x (and dy) a weight-gradient pass keeps in L1

// ---------------------------------------------------------------------------------
// The 3x3, stride-1 convolution, one image; O % 16 == 0.

void Conv3x3Image(int64_t H, int64_t W, int64_t C, int64_t O, const float* x,
                  const float* k, float* y, const Epilogue& epilogue) {
  for (int64_t h = 0; h < H; ++h) {
    if (h + 2 < H) Prefetch(x + (h + 2) * W * C, W * C);
    ForEachTile(W, O, [&](auto wb, auto nv, int64_t w0, int64_t o0) {
      constexpr int WB = decltype(wb)::value;
      Vec acc[WB][decltype(nv)::value] = {};
      for (int kh = 0; kh < 3; ++kh) {
        const int64_t row = h + kh - 1;
        if (row < 0 || row >= H) continue;
        for (int kw = 0; kw < 3; ++kw)
          AccumulateInside(acc, kw == 0 && w0 == 0, kw == 2 && w0 + WB == W,
                           x + (row * W + w0 + kw - 1) * C, C, k + (kh * 3 + kw) * C * O + o0,
                           O, C);
      }
      const int64_t at = (h * W + w0) * O + o0;
      StorePixels(acc, y + at, O, epilogue, epilogue.residual ? epilogue.residual + at : nullptr,
                  o0);
    });
  }
}

// dk (3, 3, C, O) of a group of images; O % 16 == 0.
void Conv3x3WeightGradGroup(int64_t images, int64_t H, int64_t W, int64_t C, int64_t O,
                            const float* x, const float* dy, float* dk) {
  std::fill(dk, dk + 9 * C * O, 0.0f);
  std::vector<Run> runs;
  for (int64_t b = 0; b < images; ++b) {
    const float* xb = x + b * H * W * C;
    const float* dyb = dy + b * H * W * O;
    for (int64_t h0 = 0; h0 < H; h0 += kRowsPerBlock) {
      // the next block's rows (of x, those this block does not read)
      const int64_t next = std::max<int64_t>(std::min(kRowsPerBlock, H - h0 - kRowsPerBlock), 0);
      Prefetch(xb + (h0 + kRowsPerBlock + 1) * W * C, std::max<int64_t>(next - 1, 0) * W * C);
      Prefetch(dyb + (h0 + kRowsPerBlock) * W * O, next * W * O);
      for (int kh = 0; kh < 3; ++kh)
        for (int kw = 0; kw < 3; ++kw) {
          runs.clear();
          const int64_t w_begin = kw == 0 ? 1 : 0, w_end = kw == 2 ? W - 1 : W;
          for (int64_t h = h0; h < std::min(h0 + kRowsPerBlock, H); ++h) {
            const int64_t row = h + kh - 1;
            if (row >= 0 && row < H)
              runs.push_back({xb + (row * W + w_begin + kw - 1) * C, dyb + (h * W + w_begin) * O,
                              w_end - w_begin});
          }
          AddWeightGrad(runs, C, O, C, O, dk + (kh * 3 + kw) * C * O);
        }
    }
  }
}

// ---------------------------------------------------------------------------------
// The 3x3, stride-2 transposed convolution. Along each axis, output 2i + r takes input
// i + offset through kernel tap `tap`, for the taps of its phase r:
//   r = 0: (offset -1, tap 0) and (offset 0, tap 2);   r = 1: (offset 0, tap 1).
struct Tap {
  int offset, tap;
};
constexpr Tap kPhaseTaps[2][2] = {{{-1, 0}, {0, 2}}, {{0, 1}, {0, 1}}};
constexpr int kPhaseTapCount[2] = {2, 1};

// One image x (H, W, C) -> y (2H, 2W, O); O % 16 == 0.
void ConvTransposeImage(int64_t H, int64_t W, int64_t C, int64_t O, const float* x,
                        const float* k, float* y, const Epilogue& epilogue) {
  for (int64_t h = 0; h < H; ++h) {
    if (h + 1 < H) Prefetch(x + (h + 1) * W * C, W * C);
    for (int r = 0; r < 2; ++r)
      for (int c = 0; c < 2; ++c)
        ForEachTile(W, O, [&](auto wb, auto nv, int64_t w0, int64_t o0) {
          Vec acc[decltype(wb)::value][decltype(nv)::value] = {};
          for (int a = 0; a < kPhaseTapCount[r]; ++a) {
            const Tap row = kPhaseTaps[r][a];
            if (h + row.offset < 0) continue;
            for (int b = 0; b < kPhaseTapCount[c]; ++b) {
              const Tap col = kPhaseTaps[c][b];
              AccumulateInside(acc, col.offset < 0 && w0 == 0, false,
                               x + ((h + row.offset) * W + w0 + col.offset) * C, C,
                               k + (row.tap * 3 + col.tap) * C * O + o0, O, C);
            }
          }
          const int64_t at = ((2 * h + r) * 2 * W + 2 * w0 + c) * O + o0;
          StorePixels(acc, y + at, 2 * O, epilogue,
                      epilogue.residual ? epilogue.residual + at : nullptr, o0);
        });
  }
}

// One image's dx (H, W, C) from dy (2H, 2W, O) and kt (3, 3, O, C); C % 16 == 0.
void ConvTransposeInputGradImage(int64_t H, int64_t W, int64_t C, int64_t O,
                                 const float* dy, const float* kt, float* dx) {
  for (int64_t h = 0; h < H; ++h) {
    if (h + 1 < H)  // the rows h + 1 reads that h did not
      Prefetch(dy + (2 * h + 3) * 2 * W * O, std::min<int64_t>(2, 2 * H - 2 * h - 3) * 2 * W * O);
    ForEachTile(W, C, [&](auto wb, auto nv, int64_t w0, int64_t c0) {
      constexpr int WB = decltype(wb)::value;
      Vec acc[WB][decltype(nv)::value] = {};
      for (int kh = 0; kh < 3; ++kh) {
        const int64_t row = 2 * h + 2 - kh;  // past dy's end for tap 0 of the last row
        if (row >= 2 * H) continue;
        for (int kw = 0; kw < 3; ++kw)
          AccumulateInside(acc, false, kw == 0 && w0 + WB == W,
                           dy + (row * 2 * W + 2 * w0 + 2 - kw) * O, 2 * O,
                           kt + (kh * 3 + kw) * O * C + c0, C, O);
      }
      StorePixels(acc, dx + (h * W + w0) * C + c0, C);
    });
  }
}

// dk (3, 3, C, O) of a group of images x (H, W, C), dy (2H, 2W, O); O % 16 == 0.
void ConvTransposeWeightGradGroup(int64_t images, int64_t H, int64_t W, int64_t C,
                                  int64_t O, const float* x, const float* dy, float* dk) {
  std::fill(dk, dk + 9 * C * O, 0.0f);
  std::vector<Run> runs;
  for (int64_t b = 0; b < images; ++b) {
    const float* xb = x + b * H * W * C;
    const float* dyb = dy + b * 4 * H * W * O;
    for (int64_t h0 = 0; h0 < H; h0 += kRowsPerBlock) {
      // the next block's rows
      const int64_t next = std::max<int64_t>(std::min(kRowsPerBlock, H - h0 - kRowsPerBlock), 0);
      Prefetch(xb + (h0 + kRowsPerBlock) * W * C, next * W * C);
      Prefetch(dyb + 2 * (h0 + kRowsPerBlock) * 2 * W * O, 2 * next * 2 * W * O);
      for (int kh = 0; kh < 3; ++kh)
        for (int kw = 0; kw < 3; ++kw) {
          runs.clear();
          // tap 0 of the last row (column) would reach past dy's end
          const int64_t w_end = kw == 0 ? W - 1 : W;
          for (int64_t h = h0; h < std::min(h0 + kRowsPerBlock, H); ++h) {
            const int64_t row = 2 * h + 2 - kh;
            if (row < 2 * H)
              runs.push_back({xb + h * W * C, dyb + (row * 2 * W + 2 - kw) * O, w_end});
          }
          AddWeightGrad(runs, C, 2 * O, C, O, dk + (kh * 3 + kw) * C * O);
        }
    }
  }
}

// ---------------------------------------------------------------------------------
// FFI handlers.

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

using Shape = std::vector<int64_t>;

// The last `n` dimensions of dims (which has at least n).
Shape Last(Dims dims, size_t n) { return Shape(dims.end() - n, dims.end()); }

using F32 = ffi::Buffer<ffi::F32>;
using F32Result = ffi::ResultBuffer<ffi::F32>;

ffi::Error Mismatch(const char* name) {
  return ffi::Error::InvalidArgument(std::string(name) +
                                     ": the operands' shapes disagree, or a channel count that "
                                     "must be a multiple of 16 is not");
}

// For every image n: out (..., H', W', O) = compute(in (..., H, W, C), k (3, 3, ., .)),
// after valid(in, out, k) (their last 3, 3 and 4 dimensions) has accepted the shapes.
template <class Valid, class Compute>
ffi::Error PerImage(const char* name, ffi::ThreadPool& pool, F32& in, F32& k, F32Result& out,
                    const Valid& valid, const Compute& compute) {
  auto ind = in.dimensions(), kd = k.dimensions(), outd = out->dimensions();
  const int64_t images = ItemCount({ind, outd}, 3);
  if (images < 0 || kd.size() != 4) return Mismatch(name);
  const Shape i = Last(ind, 3), o = Last(outd, 3), ks = Last(kd, 4);
  if (!valid(i, o, ks)) return Mismatch(name);
  const float* inp = in.typed_data();
  const float* kp = k.typed_data();
  float* outp = out->typed_data();
  const int64_t in_size = i[0] * i[1] * i[2], out_size = o[0] * o[1] * o[2];
  ParallelFor(pool, images, [&](int64_t n) {
    compute(i, o, inp + n * in_size, kp, outp + n * out_size, n * out_size);
  });
  return ffi::Error::Success();
}

// For every group of images: the partial weight gradient dk (..., 3, 3, C, O) =
// compute(x (..., B, H, W, C), dy (..., B, H', W', O)), after valid(x, dy) (their last
// 4 dimensions) has accepted H', W'.
template <class Valid, class Compute>
ffi::Error PerGroup(const char* name, ffi::ThreadPool& pool, F32& x, F32& dy, F32Result& dk,
                    const Valid& valid, const Compute& compute) {
  auto xd = x.dimensions(), dyd = dy.dimensions(), dkd = dk->dimensions();
  const int64_t groups = ItemCount({xd, dyd, dkd}, 4);
  if (groups < 0) return Mismatch(name);
  const Shape xs = Last(xd, 4), dys = Last(dyd, 4), dks = Last(dkd, 4);
  if (!valid(xs, dys) || dks[0] != 3 || dks[1] != 3 || dks[2] != xs[3] ||
      dks[3] != dys[3] || dys[0] != xs[0] || dys[3] % kChannelMultiple != 0)
    return Mismatch(name);
  const float* xp = x.typed_data();
  const float* dyp = dy.typed_data();
  float* dkp = dk->typed_data();
  const int64_t x_size = xs[0] * xs[1] * xs[2] * xs[3];
  const int64_t dy_size = dys[0] * dys[1] * dys[2] * dys[3], dk_size = 9 * xs[3] * dys[3];
  ParallelFor(pool, groups, [&](int64_t g) {
    compute(xs, dys, xp + g * x_size, dyp + g * dy_size, dkp + g * dk_size);
  });
  return ffi::Error::Success();
}

// Whether k (3, 3, C, O) maps x (H, W, C) to y (scale * H, scale * W, O), O % 16 == 0.
bool MapsImage(const Shape& x, const Shape& y, const Shape& k, int64_t scale) {
  return k[0] == 3 && k[1] == 3 && k[2] == x[2] && y[0] == scale * x[0] &&
         y[1] == scale * x[1] && y[2] == k[3] && k[3] % kChannelMultiple == 0;
}

// For every image: y = image_fn(x, k) after the epilogue: + bias (y's channels) +
// residual (y's shape), each if given, then a ReLU if `relu`. y is `scale` times x's size.
template <class ImageFn>
ffi::Error ConvolveImages(const char* name, int64_t scale, const ImageFn& image_fn,
                          ffi::ThreadPool& pool, F32& x, F32& k, F32Result& y,
                          const F32* bias = nullptr, const F32* residual = nullptr,
                          bool relu = false) {
  const Dims yd = y->dimensions();
  if ((bias && (bias->dimensions().size() != 1 || bias->dimensions()[0] != yd.back())) ||
      (residual && !std::equal(yd.begin(), yd.end(), residual->dimensions().begin(),
                               residual->dimensions().end())))
    return Mismatch(name);
  const Epilogue epilogue{bias ? bias->typed_data() : nullptr, nullptr, relu};
  const float* residual_data = residual ? residual->typed_data() : nullptr;
  return PerImage(
      name, pool, x, k, y,
      [scale](const Shape& x, const Shape& y, const Shape& k) {
        return MapsImage(x, y, k, scale);
      },
      [&](const Shape& x, const Shape& y, const float* xp, const float* kp, float* yp,
          int64_t offset) {
        Epilogue image = epilogue;
        if (residual_data) image.residual = residual_data + offset;
        image_fn(x[0], x[1], x[2], y[2], xp, kp, yp, image);
      });
}

ffi::Error Conv3x3(ffi::ThreadPool pool, F32 x, F32 k, F32Result y) {
  return ConvolveImages("conv3x3", 1, Conv3x3Image, pool, x, k, y);
}

// relu(conv3x3(x, k) + bias [+ residual]): the residual block's convolutions.
ffi::Error Conv3x3BiasRelu(ffi::ThreadPool pool, F32 x, F32 k, F32 bias, F32Result y) {
  return ConvolveImages("conv3x3_bias_relu", 1, Conv3x3Image, pool, x, k, y, &bias, nullptr,
                        true);
}

ffi::Error Conv3x3BiasAddRelu(ffi::ThreadPool pool, F32 x, F32 k, F32 bias, F32 residual,
                              F32Result y) {
  return ConvolveImages("conv3x3_bias_add_relu", 1, Conv3x3Image, pool, x, k, y, &bias,
                        &residual, true);
}

ffi::Error Conv3x3WeightGrad(ffi::ThreadPool pool, F32 x, F32 dy, F32Result dk) {
  return PerGroup(
      "conv3x3_weight_grad", pool, x, dy, dk,
      [](const Shape& x, const Shape& dy) {
        return dy[1] == x[1] && dy[2] == x[2];
      },
      [](const Shape& x, const Shape& dy, const float* xp, const float* dyp, float* dkp) {
        Conv3x3WeightGradGroup(x[0], x[1], x[2], x[3], dy[3], xp, dyp, dkp);
      });
}

ffi::Error ConvTranspose(ffi::ThreadPool pool, F32 x, F32 k, F32Result y) {
  return ConvolveImages("conv_transpose3x3s2", 2, ConvTransposeImage, pool, x, k, y);
}

// relu(conv_transpose(x, k) + bias): the decoder's upsampling layers.
ffi::Error ConvTransposeBiasRelu(ffi::ThreadPool pool, F32 x, F32 k, F32 bias, F32Result y) {
  return ConvolveImages("conv_transpose3x3s2_bias_relu", 2, ConvTransposeImage, pool, x, k, y,
                        &bias, nullptr, true);
}

// kt (3, 3, O, C) maps dy (2H, 2W, O) to dx (H, W, C) as the transpose of k (3, 3, C, O)
// maps dx to dy.
ffi::Error ConvTransposeInputGrad(ffi::ThreadPool pool, F32 dy, F32 kt, F32Result dx) {
  return PerImage(
      "conv_transpose3x3s2_input_grad", pool, dy, kt, dx,
      [](const Shape& dy, const Shape& dx, const Shape& kt) {
        return MapsImage(dx, dy, {3, 3, kt[3], kt[2]}, 2) && kt[0] == 3 && kt[1] == 3 &&
               kt[3] % kChannelMultiple == 0;
      },
      [](const Shape& dy, const Shape& dx, const float* dyp, const float* ktp, float* dxp,
         int64_t) {
        ConvTransposeInputGradImage(dx[0], dx[1], dx[2], dy[2], dyp, ktp, dxp);
      });
}

ffi::Error ConvTransposeWeightGrad(ffi::ThreadPool pool, F32 x, F32 dy, F32Result dk) {
  return PerGroup(
      "conv_transpose3x3s2_weight_grad", pool, x, dy, dk,
      [](const Shape& x, const Shape& dy) {
        return dy[1] == 2 * x[1] && dy[2] == 2 * x[2];
      },
      [](const Shape& x, const Shape& dy, const float* xp, const float* dyp, float* dkp) {
        ConvTransposeWeightGradGroup(x[0], x[1], x[2], x[3], dy[3], xp, dyp, dkp);
      });
}

// Every handler: XLA's thread pool, two float32 operands (and the epilogue's bias and
// residual), one float32 result.
auto Operands() { return ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<F32>().Arg<F32>(); }

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FvaeConv3x3, Conv3x3, Operands().Ret<F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(FvaeConv3x3WeightGrad, Conv3x3WeightGrad, Operands().Ret<F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(FvaeConv3x3BiasRelu, Conv3x3BiasRelu,
                              Operands().Arg<F32>().Ret<F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(FvaeConv3x3BiasAddRelu, Conv3x3BiasAddRelu,
                              Operands().Arg<F32>().Arg<F32>().Ret<F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(FvaeConvTranspose3x3s2, ConvTranspose, Operands().Ret<F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(FvaeConvTranspose3x3s2BiasRelu, ConvTransposeBiasRelu,
                              Operands().Arg<F32>().Ret<F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(FvaeConvTranspose3x3s2InputGrad, ConvTransposeInputGrad,
                              Operands().Ret<F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(FvaeConvTranspose3x3s2WeightGrad, ConvTransposeWeightGrad,
                              Operands().Ret<F32>());
