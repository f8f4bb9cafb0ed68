// The bit-packed convolution for the CPU, as an XLA FFI custom call.
//
// The pure-JAX path (bnn_jax/packed.py) computes the same integers; this exists because XLA
// cannot keep a tile of XNOR-popcount accumulators in registers. Built by
// bnn_jax/kernels/__init__.py with the machine's g++ and -march=native: with AVX-512 VPOPCNTDQ a
// tile is 4 pixels x 64 output channels in 16 registers, one 512-bit XOR + VPOPCNTD + ADD per
// 16 channels x 32 input bits; elsewhere a scalar loop, which the compiler vectorises as it can.
//
// XnorConv: activations (N, H, W, groups * words) uint32 (bit 1 = +1, each group's channels in
// its own words, the last word's unused bits 0), weights (groups * taps * words, O / groups)
// uint32, by group, tap-major (row-major kernel positions), then words. Output int32
// (N, H', W', O), group j's outputs from j * O / groups: the exact ±1 dot products. The padding
// is the kernel's: a tap outside the input reads +1 or -1 (pad_value ±1), or adds nothing
// (pad_value 0, as a zero-padded float conv).

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Runs body(chunk) for chunk in [0, chunks) on the calling thread and the pool's. Chunks come
// from an atomic counter, so a pool task that starts after the work is done takes none, and the
// caller waits only for chunks already taken (never for a queued task: no deadlock).
void ParallelFor(ffi::ThreadPool& pool, int64_t chunks, std::function<void(int64_t)> body) {
  struct Shared {
    std::function<void(int64_t)> body;
    int64_t chunks;
    std::atomic<int64_t> next{0}, done{0};
    std::mutex mutex;
    std::condition_variable finished;
    void Run() {
      for (int64_t chunk; (chunk = next.fetch_add(1)) < chunks;) {
        body(chunk);
        if (done.fetch_add(1) + 1 == chunks) {
          std::lock_guard<std::mutex> lock(mutex);
          finished.notify_all();
        }
      }
    }
  };
  auto shared = std::make_shared<Shared>();
  shared->body = std::move(body);
  shared->chunks = chunks;
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), chunks) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([shared] { shared->Run(); });
  shared->Run();
  std::unique_lock<std::mutex> lock(shared->mutex);
  shared->finished.wait(lock, [&] { return shared->done.load() == shared->chunks; });
}

// One group's convolution (groups == 1: the whole one): `words`, `outputs` and `channels` are the
// group's, `in` points at its first word; a pixel holds `pixel_words` words of all groups and an
// output pixel `out_stride` outputs.
struct Geometry {
  int64_t batch, in_h, in_w, words, out_h, out_w, outputs, kernel, stride, dilation, channels;
  int64_t pad_top, pad_left, pad_value, pixel_words, out_stride;
  const uint32_t* in;
  const uint32_t* pad_word;  // one tap of the padding's bits (pad_value ±1)

  int64_t taps() const { return kernel * kernel; }
  int64_t pixels() const { return batch * out_h * out_w; }
};

// Where an output pixel's kernel window starts in the input (possibly in the padding).
struct Window {
  const uint32_t* image;
  int64_t top, left;
  int64_t inside;  // taps inside the input

  Window() = default;
  Window(const Geometry& g, int64_t n, int64_t y, int64_t x)
      : image(g.in + n * g.in_h * g.in_w * g.pixel_words),
        top(y * g.stride - g.pad_top),
        left(x * g.stride - g.pad_left),
        inside(Inside(top, g.in_h, g) * Inside(left, g.in_w, g)) {}
  // Tap (i, j)'s words, or nullptr where it falls in the padding.
  const uint32_t* Tap(const Geometry& g, int64_t i, int64_t j) const {
    const int64_t y = top + i * g.dilation, x = left + j * g.dilation;
    if (y < 0 || y >= g.in_h || x < 0 || x >= g.in_w) return nullptr;
    return image + (y * g.in_w + x) * g.pixel_words;
  }
  // K: every tap's channels, or (zero padding) those of the taps inside.
  int32_t Depth(const Geometry& g) const {
    return static_cast<int32_t>((g.pad_value == 0 ? inside : g.taps()) * g.channels);
  }
  // How many of a window's kernel positions from `start` fall in [0, size) on one axis.
  static int64_t Inside(int64_t start, int64_t size, const Geometry& g) {
    int64_t count = 0;
    for (int64_t i = 0; i < g.kernel; ++i) count += start + i * g.dilation >= 0 &&
                                                     start + i * g.dilation < size;
    return count;
  }
};

// The windows of consecutive output pixels, from one division for the first.
class Windows {
 public:
  Windows(const Geometry& g, int64_t pixel)
      : g_(g), x_(pixel % g.out_w), y_(pixel / g.out_w % g.out_h), n_(pixel / g.out_w / g.out_h) {}
  Window Next() {
    const Window window(g_, n_, y_, x_);
    if (++x_ == g_.out_w) x_ = 0, ++y_;
    if (y_ == g_.out_h) y_ = 0, ++n_;
    return window;
  }

 private:
  const Geometry& g_;
  int64_t x_, y_, n_;
};

constexpr int kPixels = 4;  // pixels per register tile

#if defined(__AVX512F__) && defined(__AVX512VPOPCNTDQ__)
constexpr int kLanes = 16;   // output channels per 512-bit register
constexpr int kVectors = 4;  // registers of output channels per tile
constexpr int64_t kChannelsPerTile = kLanes * kVectors;

// acc[p][v] += popcount(source[p][r] ^ rows[r][v]) for r < count, where counted[p] (a
// zero-padded tap outside the input adds nothing); `rows` strides by `outputs` words.
template <int P, int V>
inline void Accumulate(__m512i (&acc)[P][V], const uint32_t* const (&source)[P],
                       const __mmask16 (&counted)[P], const uint32_t* rows, int64_t count,
                       int64_t outputs, __mmask16 last_mask) {
  for (int64_t r = 0; r < count; ++r, rows += outputs) {
    __m512i weights[V];
    for (int v = 0; v < V; ++v)
      weights[v] = _mm512_maskz_loadu_epi32(v == V - 1 ? last_mask : 0xFFFF, rows + v * kLanes);
    for (int p = 0; p < P; ++p) {
      const __m512i a = _mm512_set1_epi32(static_cast<int>(source[p][r]));
      for (int v = 0; v < V; ++v)
        acc[p][v] = _mm512_mask_add_epi32(acc[p][v], counted[p], acc[p][v],
                                          _mm512_popcnt_epi32(_mm512_xor_si512(a, weights[v])));
    }
  }
}

// One tile: P pixels x V registers of output channels from `first`; `last_mask` masks the last
// register's channels (O need not be a multiple of 16). Where every window lies inside the input
// (and the kernel is not dilated) a kernel row's taps are consecutive words in the input and in
// the weights: one run of kernel * words each, not kernel runs of words (one group only).
template <int P, int V>
void Tile(const Geometry& g, const uint32_t* w, int32_t* out, int64_t pixel, int64_t first,
          const Window* windows, __mmask16 last_mask) {
  __m512i acc[P][V];
  for (int p = 0; p < P; ++p)
    for (int v = 0; v < V; ++v) acc[p][v] = _mm512_setzero_si512();
  bool interior = g.dilation == 1 && g.pixel_words == g.words;
  for (int p = 0; p < P; ++p) interior = interior && windows[p].inside == g.taps();
  const uint32_t* source[P];
  __mmask16 counted[P];
  const int64_t row_words = g.kernel * g.words;
  for (int64_t i = 0; i < g.kernel; ++i) {
    const uint32_t* rows = w + i * row_words * g.outputs + first;
    if (interior) {
      for (int p = 0; p < P; ++p) source[p] = windows[p].Tap(g, i, 0), counted[p] = 0xFFFF;
      Accumulate<P, V>(acc, source, counted, rows, row_words, g.outputs, last_mask);
      continue;
    }
    for (int64_t j = 0; j < g.kernel; ++j, rows += g.words * g.outputs) {
      for (int p = 0; p < P; ++p) {
        source[p] = windows[p].Tap(g, i, j);
        counted[p] = source[p] != nullptr || g.pad_value != 0 ? 0xFFFF : 0;
        if (source[p] == nullptr) source[p] = g.pad_word;
      }
      Accumulate<P, V>(acc, source, counted, rows, g.words, g.outputs, last_mask);
    }
  }
  for (int p = 0; p < P; ++p) {
    const __m512i depth = _mm512_set1_epi32(windows[p].Depth(g));
    for (int v = 0; v < V; ++v)
      _mm512_mask_storeu_epi32(out + (pixel + p) * g.out_stride + first + v * kLanes,
                               v == V - 1 ? last_mask : 0xFFFF,
                               _mm512_sub_epi32(depth, _mm512_slli_epi32(acc[p][v], 1)));
  }
}

template <int P>
void PixelTile(const Geometry& g, const uint32_t* w, int32_t* out, int64_t pixel, int64_t first,
               const Window* windows) {
  const int64_t left = g.outputs - first;
  const int vectors = static_cast<int>(std::min<int64_t>(kVectors, (left + kLanes - 1) / kLanes));
  const int tail = static_cast<int>(left - (vectors - 1) * kLanes);
  const __mmask16 mask = tail >= kLanes ? 0xFFFF : static_cast<__mmask16>((1u << tail) - 1);
  switch (vectors) {
    case 4: return Tile<P, 4>(g, w, out, pixel, first, windows, mask);
    case 3: return Tile<P, 3>(g, w, out, pixel, first, windows, mask);
    case 2: return Tile<P, 2>(g, w, out, pixel, first, windows, mask);
    default: return Tile<P, 1>(g, w, out, pixel, first, windows, mask);
  }
}

// Pixels [pixel, end) x output channels [first, first + kChannelsPerTile).
void Block(const Geometry& g, const uint32_t* w, int32_t* out, int64_t pixel, int64_t end,
           int64_t first) {
  Windows next(g, pixel);
  Window windows[kPixels];
  for (; pixel + kPixels <= end; pixel += kPixels) {
    for (Window& window : windows) window = next.Next();
    PixelTile<kPixels>(g, w, out, pixel, first, windows);
  }
  for (; pixel < end; ++pixel) {
    windows[0] = next.Next();
    PixelTile<1>(g, w, out, pixel, first, windows);
  }
}

#else
constexpr int64_t kChannelsPerTile = 64;

void Block(const Geometry& g, const uint32_t* w, int32_t* out, int64_t pixel, int64_t end,
           int64_t first) {
  const int64_t last = std::min(g.outputs, first + kChannelsPerTile);
  Windows next(g, pixel);
  for (; pixel < end; ++pixel) {
    const Window window = next.Next();
    int32_t acc[kChannelsPerTile] = {0};
    for (int64_t i = 0; i < g.kernel; ++i)
      for (int64_t j = 0; j < g.kernel; ++j) {
        const uint32_t* source = window.Tap(g, i, j);
        if (source == nullptr && g.pad_value == 0) continue;
        if (source == nullptr) source = g.pad_word;
        const uint32_t* rows = w + (i * g.kernel + j) * g.words * g.outputs;
        for (int64_t word = 0; word < g.words; ++word, rows += g.outputs)
          for (int64_t o = first; o < last; ++o)
            acc[o - first] += __builtin_popcount(source[word] ^ rows[o]);
      }
    for (int64_t o = first; o < last; ++o)
      out[pixel * g.out_stride + o] = window.Depth(g) - 2 * acc[o - first];
  }
}

#endif

ffi::Error XnorConvImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::U32> input,
                        ffi::Buffer<ffi::U32> weights, ffi::ResultBuffer<ffi::S32> output,
                        int64_t kernel, int64_t stride, int64_t dilation, int64_t channels,
                        int64_t pad_top, int64_t pad_left, int64_t pad_value, int64_t groups) {
  const auto in_dims = input.dimensions(), out_dims = output->dimensions();
  if (in_dims.size() != 4 || out_dims.size() != 4 || weights.dimensions().size() != 2)
    return ffi::Error::InvalidArgument("xnor_conv: activations and output NHWC, weights 2-D");
  if (groups < 1 || in_dims[3] % groups || out_dims[3] % groups)
    return ffi::Error::InvalidArgument("xnor_conv: words and outputs split into the groups");
  const int64_t words = in_dims[3] / groups, outputs = out_dims[3] / groups;
  const Geometry all{in_dims[0], in_dims[1], in_dims[2], words, out_dims[1], out_dims[2], outputs,
                     kernel, stride, dilation, channels, pad_top, pad_left, pad_value,
                     in_dims[3], out_dims[3], input.typed_data(), nullptr};
  const int64_t group_rows = all.taps() * words;  // weight rows of one group
  if (weights.dimensions()[0] != groups * group_rows || weights.dimensions()[1] != outputs)
    return ffi::Error::InvalidArgument("xnor_conv: weights are not (groups * taps * words, O)");
  if ((words - 1) * 32 >= channels || words * 32 < channels)
    return ffi::Error::InvalidArgument("xnor_conv: words do not hold the channels");
  std::vector<uint32_t> pad_word;  // +1: the channels' bits set; -1: none
  for (int64_t word = 0; word < words; ++word) {
    const int64_t bits = std::min<int64_t>(32, channels - 32 * word);
    pad_word.push_back(pad_value == 1 ? static_cast<uint32_t>((uint64_t{1} << bits) - 1) : 0);
  }
  const uint32_t* w = weights.typed_data();
  int32_t* out = output->typed_data();
  const int64_t tiles = (outputs + kChannelsPerTile - 1) / kChannelsPerTile;
  // About 8 chunks per thread, each of at least 16 pixels, in whole register tiles of pixels.
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t per_tile = std::max<int64_t>(1, (8 * threads + groups * tiles - 1) / (groups * tiles));
  int64_t pixels = std::max<int64_t>(16, (all.pixels() + per_tile - 1) / per_tile);
  pixels = (pixels + kPixels - 1) / kPixels * kPixels;
  const int64_t chunks_per_tile = (all.pixels() + pixels - 1) / pixels;
  ParallelFor(pool, groups * tiles * chunks_per_tile, [&](int64_t chunk) {
    const int64_t start = chunk % chunks_per_tile * pixels, tile = chunk / chunks_per_tile;
    const int64_t group = tile / tiles;
    Geometry g = all;
    g.in += group * words;
    g.pad_word = pad_word.data();
    Block(g, w + group * group_rows * outputs, out + group * outputs, start,
          std::min(g.pixels(), start + pixels), tile % tiles * kChannelsPerTile);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(XnorConv, XnorConvImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("kernel")
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("dilation")
                                  .Attr<int64_t>("channels")
                                  .Attr<int64_t>("pad_top")
                                  .Attr<int64_t>("pad_left")
                                  .Attr<int64_t>("pad_value")
                                  .Attr<int64_t>("groups"));
