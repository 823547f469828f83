// Index logic of the submanifold sparse convolution, shared by the CPU engine
// (submconv_cpu.cpp) and the CUDA kernel-map code. No ATen: plain integers.
//
// Every problem is viewed as 3-D: a 2-D input [B, C, H, W] is [B, C, 1, H, W]
// with a kernel of depth 1. The kernel map is a dense int32 index grid
// `grid[b, z, y, x]` holding the compact row of an active site and -1 elsewhere,
// so finding the neighbour of a site at a kernel offset is one bounds check and
// one load (no hash table).
#pragma once

#include <cstdint>

#include "../common/host_device.h"

namespace tcm {
namespace submconv {

struct Geometry {
  int64_t batch, depth, height, width;  // spatial grid (depth = 1 in 2-D)
  int32_t kd, kh, kw;                   // odd kernel extents (kd = 1 in 2-D)
  int32_t dd, dh, dw;                   // dilation

  TCM_HOST_DEVICE int64_t sites_per_image() const { return depth * height * width; }
  TCM_HOST_DEVICE int32_t kernel_volume() const { return kd * kh * kw; }
};

struct Site {
  int64_t b, z, y, x;
};

// Linear site index (b, z, y, x) -> coordinates.
TCM_HOST_DEVICE Site decode_site(const Geometry& g, int64_t linear) {
  Site s;
  s.x = linear % g.width;
  linear /= g.width;
  s.y = linear % g.height;
  linear /= g.height;
  s.z = linear % g.depth;
  s.b = linear / g.depth;
  return s;
}

struct Offset {
  int32_t dz, dy, dx;
};

// Displacement read by kernel tap `k` (row-major over kd, kh, kw, the order of the weight's trailing dims):
// tap (i, j, l) reads the site displaced by ((i - kd/2) dd, (j - kh/2) dh, (l - kw/2) dw), i.e.
// cross-correlation with "same" padding, as torch.nn.functional.conv*d.
TCM_HOST_DEVICE Offset tap_offset(const Geometry& g, int32_t k) {
  const int32_t l = k % g.kw;
  const int32_t j = (k / g.kw) % g.kh;
  const int32_t i = k / (g.kw * g.kh);
  return Offset{(i - g.kd / 2) * g.dd, (j - g.kh / 2) * g.dh, (l - g.kw / 2) * g.dw};
}

// Row of the neighbour of `s` displaced by `o`, or -1 when it is outside the grid or inactive.
TCM_HOST_DEVICE int32_t neighbour_row(const Geometry& g, const int32_t* grid, const Site& s, const Offset& o) {
  const int64_t z = s.z + o.dz, y = s.y + o.dy, x = s.x + o.dx;
  if (z < 0 || z >= g.depth || y < 0 || y >= g.height || x < 0 || x >= g.width) return -1;
  return grid[((s.b * g.depth + z) * g.height + y) * g.width + x];
}

TCM_HOST_DEVICE int32_t neighbour_row(const Geometry& g, const int32_t* grid, const Site& s, int32_t k) {
  return neighbour_row(g, grid, s, tap_offset(g, k));
}

}  // namespace submconv
}  // namespace tcm
