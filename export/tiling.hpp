// Padding, tiling and blending: the C++ twin of tur_ext/inference.py (module docstring, steps 2-3). The two must stay
// identical: tests/test_runner.py compares this runner with `tur restore` pixel by pixel.
#pragma once

#include <torch/torch.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace tur {

// The option a tiling error is about, and the message (without the option name).
struct TilingError : std::invalid_argument {
  std::string option;
  TilingError(std::string opt, const std::string& msg) : std::invalid_argument(msg), option(std::move(opt)) {}
};

inline constexpr int64_t kDefaultOverlap = 32;

// Indices into a side of `size` that produce `padded` entries: the identity, then reflection without repeating the
// edge (0 1 .. n-1 n-2 .. 1 0 1 ..), or repetition for a side of one pixel (tur_ext.models.padding).
inline torch::Tensor reflect_index(int64_t size, int64_t padded, const torch::Device& device) {
  auto i = torch::arange(padded, torch::TensorOptions().dtype(torch::kLong).device(device));
  if (size == 1) return i.clamp_max(0);
  const int64_t period = 2 * size - 2;
  auto j = i.remainder(period);
  return torch::where(j < size, j, period - j);
}

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// Reflect-pad the last two dims on the bottom/right up to multiples of `m`, and at least `min_size`.
inline torch::Tensor pad_to_multiple(const torch::Tensor& x, int64_t m, int64_t min_size = 1) {
  const int64_t h = x.size(-2), w = x.size(-1);
  const int64_t ph = round_up(std::max(h, min_size), m), pw = round_up(std::max(w, min_size), m);
  torch::Tensor y = x;
  if (ph != h) y = y.index_select(-2, reflect_index(h, ph, x.device()));
  if (pw != w) y = y.index_select(-1, reflect_index(w, pw, x.device()));
  return y;
}

// (tile, overlap) after rounding the tile down to a multiple of `m` and defaulting the overlap, or nullopt for no
// tiling (tile == 0); the tile must be at least `min_size`, the model's smallest input. Throws TilingError naming the
// option.
inline std::optional<std::pair<int64_t, int64_t>> resolve_tiling(int64_t tile, std::optional<int64_t> overlap,
                                                                 int64_t m, int64_t min_size = 1) {
  if (tile == 0) {
    if (overlap) throw TilingError("--overlap", "only meaningful with --tile");
    return std::nullopt;
  }
  if (tile < 0) throw TilingError("--tile", "expected a positive number of pixels (or 0 for none), got " +
                                                std::to_string(tile));
  if (tile < m)
    throw TilingError("--tile", std::to_string(tile) + " is smaller than the model's size multiple " +
                                    std::to_string(m) + "; expected a tile of at least " + std::to_string(m) +
                                    " pixels");
  if (tile < min_size)
    throw TilingError("--tile", std::to_string(tile) + " is smaller than the model's smallest input " +
                                    std::to_string(min_size) + "; expected a tile of at least " +
                                    std::to_string(min_size) + " pixels");
  const int64_t t = tile / m * m;
  const int64_t o = overlap ? *overlap : std::min(kDefaultOverlap, t / 2);
  if (o < 0 || o >= t)
    throw TilingError("--overlap", "expected 0 <= overlap < tile (" + std::to_string(t) + " after rounding tile " +
                                       std::to_string(tile) + " down to a multiple of " + std::to_string(m) +
                                       "), got " + std::to_string(o));
  return std::make_pair(t, o);
}

// Start offsets of the tiles along a side of `length`; the tile length is min(tile, length).
inline std::vector<int64_t> tile_starts(int64_t length, int64_t tile, int64_t overlap) {
  const int64_t t = std::min(tile, length);
  if (length <= t) return {0};
  const int64_t stride = t - overlap;
  const int64_t n = (length - t + stride - 1) / stride + 1;
  std::vector<int64_t> starts;
  starts.reserve(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) starts.push_back(std::min(i * stride, length - t));
  return starts;
}

// w(i) = min(i + 1, size - i, overlap + 1) / (overlap + 1) along a side covered by several tiles, else 1.
inline torch::Tensor blend_weights(int64_t size, int64_t overlap, size_t count) {
  if (count == 1) return torch::ones({size}, torch::kFloat);
  auto i = torch::arange(size, torch::kLong);
  auto ramp = torch::minimum(torch::minimum(i + 1, size - i), torch::tensor(overlap + 1, torch::kLong));
  return ramp.to(torch::kFloat) / static_cast<double>(overlap + 1);
}

// Run `fn` over the tiles of the padded (B, C, H, W) `x` and blend: sum(w * out) / sum(w), tiles row by row.
template <class Fn>
torch::Tensor run_tiled(Fn&& fn, const torch::Tensor& x, int64_t tile, int64_t overlap) {
  const int64_t h = x.size(-2), w = x.size(-1);
  const auto ys = tile_starts(h, tile, overlap), xs = tile_starts(w, tile, overlap);
  const int64_t th = std::min(tile, h), tw = std::min(tile, w);
  if (ys.size() == 1 && xs.size() == 1) return fn(x);
  auto wy = blend_weights(th, overlap, ys.size()).to(x.device());
  auto wx = blend_weights(tw, overlap, xs.size()).to(x.device());
  auto weight = wy.unsqueeze(1) * wx.unsqueeze(0);
  torch::Tensor acc;
  auto wsum = torch::zeros({h, w}, torch::TensorOptions().dtype(torch::kFloat).device(x.device()));
  for (int64_t y0 : ys) {
    for (int64_t x0 : xs) {
      auto out = fn(x.narrow(-2, y0, th).narrow(-1, x0, tw)).to(torch::kFloat);
      if (!acc.defined())
        acc = torch::zeros({out.size(0), out.size(1), h, w},
                           torch::TensorOptions().dtype(torch::kFloat).device(x.device()));
      acc.narrow(-2, y0, th).narrow(-1, x0, tw).add_(out * weight);
      wsum.narrow(-2, y0, th).narrow(-1, x0, tw).add_(weight);
    }
  }
  return acc / wsum;
}

}  // namespace tur
