#include "worker/gpu_peak.h"

namespace gyre {

double PeakDenseBf16Flops(const std::string& name) {
  auto has = [&](const char* s) { return name.find(s) != std::string::npos; };
  // Order matters: the PCIe / NVL variants share the prefix of the SXM parts.
  if (has("H100") && has("PCIe")) return 756e12;
  if (has("H100 NVL")) return 835e12;
  if (has("H100") || has("H200") || has("H800") || has("GH200")) return 989e12;  // SXM
  if (has("B200")) return 2250e12;
  if (has("A100")) return 312e12;
  if (has("L40S")) return 362e12;
  if (has("A10G") || has("A10 ")) return 125e12;
  return 0;
}

}  // namespace gyre
