// Host+device geometry of tcm::masked_recon_loss: images [B, C, D, H, W]
// (2-D images are D = 1 with patch depth 1) cut into patches of pd x ph x pw;
// patch n of sample b is (zd, zh, zw) in row-major order over the patch grid
// (gd, gh, gw), the order of tcm_kernels.patch_scores and sample_mask.
#pragma once

#include <cstdint>

#include "../common/host_device.h"

namespace tcm {
namespace recon_loss {

struct Geometry {
  int64_t C, D, H, W;     // image
  int64_t pd, ph, pw;     // patch
  int64_t gd, gh, gw;     // patch grid
  TCM_HOST_DEVICE int64_t patches() const { return gd * gh * gw; }
  TCM_HOST_DEVICE int64_t patch_elems() const { return C * pd * ph * pw; }
  // Offset (in elements, within sample b's image) of the first element of patch n.
  TCM_HOST_DEVICE int64_t patch_origin(int64_t n) const {
    const int64_t zw = n % gw, zh = (n / gw) % gh, zd = n / (gw * gh);
    return ((zd * pd) * H + zh * ph) * W + zw * pw;
  }
  // Offset of row r (r over C * pd * ph rows of pw contiguous elements) from the patch origin.
  TCM_HOST_DEVICE int64_t row_offset(int64_t r) const {
    const int64_t y = r % ph, z = (r / ph) % pd, c = r / (ph * pd);
    return ((c * D + z) * H + y) * W;
  }
};

}  // namespace recon_loss
}  // namespace tcm
