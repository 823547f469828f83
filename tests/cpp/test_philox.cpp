// Philox-4x32-10 against Random123's known-answer vectors (tests/kat_vectors,
// the three "philox4x32 10" lines: counter, key, expected output).
#include "check.h"
#include "common/philox.h"

int main() {
  struct Vec {
    uint32_t ctr[4], key[2], out[4];
  } vecs[] = {
      {{0, 0, 0, 0}, {0, 0}, {0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8}},
      {{0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff},
       {0xffffffff, 0xffffffff},
       {0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd}},
      {{0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344},
       {0xa4093822, 0x299f31d0},
       {0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1}},
  };
  for (const auto& v : vecs) {
    const tcm::Philox4 r = tcm::philox4x32_10(v.ctr[0], v.ctr[1], v.ctr[2], v.ctr[3], v.key[0], v.key[1]);
    for (int j = 0; j < 4; ++j) CHECK_EQ(r.x[j], v.out[j]);
  }
  return tcm_failures();
}
