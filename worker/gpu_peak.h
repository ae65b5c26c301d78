// Peak dense bf16 tensor-core throughput of known GPUs, the denominator of MFU. Vendor figures
// without sparsity (NVIDIA data sheets); 0 for a GPU not in the table, so nobody reports an MFU
// against a guessed peak.
#pragma once

#include <string>

namespace gyre {

// `name`: cudaDeviceProp::name, e.g. "NVIDIA H100 80GB HBM3". FLOP/s, or 0 when unknown.
double PeakDenseBf16Flops(const std::string& name);

}  // namespace gyre
