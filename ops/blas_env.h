// OpenBLAS core selection. Debian's OpenBLAS is built with DYNAMIC_ARCH and picks its kernels
// from the CPU model number at load time; on virtual machines that report a generic "Intel Xeon
// Processor" it falls back to the SSE3 "Prescott" kernels, 2.5-5x slower than the AVX2/AVX-512
// ones the CPU actually supports (measured here: 20 vs 52 (Haswell) vs 107 (SkylakeX) GFLOP/s,
// sgemm 512x256x256, one thread). The core can only be chosen through the OPENBLAS_CORETYPE
// environment variable before the library loads, so a program re-executes itself once with the
// variable set to the best core the CPU's feature flags allow.
#pragma once

#include <string>

namespace gyre::ops {

// The kernel family OpenBLAS selected ("SkylakeX", "Haswell", "Prescott", ...).
std::string BlasCoreName();

// If OPENBLAS_CORETYPE is unset and OpenBLAS fell back to a core weaker than the CPU supports,
// sets OPENBLAS_CORETYPE and re-executes /proc/self/exe with the same argv (does not return on
// success). Otherwise returns. Call first thing in main().
void ReexecWithBestBlasCore(char** argv);

}  // namespace gyre::ops
