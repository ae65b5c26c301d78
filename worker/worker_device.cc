#include "worker/worker_device.h"

#include <cstdlib>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"

namespace gyre {

absl::StatusOr<std::string> NarrowVisibleDevices(const std::string& visible, int index) {
  if (index < 0) return absl::InvalidArgumentError(absl::StrCat("GPU index ", index, " is negative"));
  if (visible.empty()) return absl::StrCat(index);
  std::vector<std::string> ids = absl::StrSplit(visible, ',', absl::SkipWhitespace());
  if (index >= static_cast<int>(ids.size())) {
    return absl::InvalidArgumentError(
        absl::StrCat("GPU index ", index, " but CUDA_VISIBLE_DEVICES=", visible, " shows ", ids.size()));
  }
  return std::string(absl::StripAsciiWhitespace(ids[index]));
}

absl::StatusOr<std::string> ResolveWorkerDevice(const std::string& device, GpuRuntime* gpu) {
  if (device == "cpu") return std::string("cpu");
  if (device == "auto") return std::string(gpu != nullptr && gpu->DeviceCount() > 0 ? "cuda" : "cpu");
  absl::string_view rest(device.data(), device.size());
  if (!absl::ConsumePrefix(&rest, "cuda")) {
    return absl::InvalidArgumentError(absl::StrCat("--device ", device, ": expected cpu, cuda, cuda:<index> or auto"));
  }
  if (gpu == nullptr) {
    return absl::FailedPreconditionError(
        absl::StrCat("--device ", device, ": this binary was built without CUDA (bazel build --config=cuda)"));
  }
  if (!rest.empty()) {
    int index = -1;
    if (!absl::ConsumePrefix(&rest, ":") || !absl::SimpleAtoi(rest, &index)) {
      return absl::InvalidArgumentError(absl::StrCat("--device ", device, ": expected cuda:<index>"));
    }
    const char* visible = std::getenv("CUDA_VISIBLE_DEVICES");
    absl::StatusOr<std::string> narrowed = NarrowVisibleDevices(visible == nullptr ? "" : visible, index);
    if (!narrowed.ok()) return narrowed.status();
    ::setenv("CUDA_VISIBLE_DEVICES", narrowed->c_str(), 1);
  }
  if (gpu->DeviceCount() < 1) return absl::FailedPreconditionError(absl::StrCat("--device ", device, ": no CUDA device visible"));
  return std::string("cuda");
}

}  // namespace gyre
