// What the AMX kernels share (Sapphire Rapids and later): the permission to use tiles, and their configuration.
#pragma once

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AMX_INT8__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>

#define KVSERVE_AMX 1

namespace kvserve {

constexpr int64_t kAmxRows = 16, kAmxRowBytes = 64;   // a tile's rows, and the bytes of one of its rows

// Linux hands AMX's tile data to a process only on request (ARCH_REQ_XCOMP_PERM for XTILEDATA).
inline bool amx_permitted() {
  static const bool permitted = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  return permitted;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

}  // namespace kvserve
#endif
