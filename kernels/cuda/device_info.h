// Device discovery and the smallest real kernel: a blockwise checksum reduction that the GPU
// bundle probe and the GPU tests use to prove a host -> device -> kernel -> host round trip.
//
// nvcc-compiled code keeps to plain C++ (no abseil): functions return a CudaResult whose
// message is empty on success; callers in ops/ and tools/ turn it into absl::Status.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace gyre::cuda {

struct CudaResult {
  int code = 0;             // cudaError_t value; 0 = success
  std::string message;      // "cudaMalloc: out of memory" etc.
  bool ok() const { return code == 0; }
};

struct DeviceInfo {
  int ordinal = 0;
  std::string name;
  int sm_major = 0;
  int sm_minor = 0;
  int multiprocessors = 0;
  uint64_t global_memory_bytes = 0;
  int driver_version = 0;   // e.g. 13000 for CUDA 13.0
  int runtime_version = 0;
};

// Fills `out` with all visible devices; no devices is success with an empty list.
CudaResult ListDevices(std::vector<DeviceInfo>* out);

// Sum of the values (in double) and the wrapping sum of (i + 1) * bit_pattern(x_i), computed on
// `device`. The bit term catches permuted or partially copied buffers that a sum would miss.
struct BufferChecksum {
  double sum = 0.0;
  uint64_t weighted_bits = 0;
};
CudaResult ChecksumOnDevice(int device, const std::vector<float>& values, BufferChecksum* out);
BufferChecksum ChecksumOnHost(const std::vector<float>& values);

}  // namespace gyre::cuda
