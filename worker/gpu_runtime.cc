#include "worker/gpu_runtime.h"

namespace gyre {
namespace {
GpuRuntime* g_runtime = nullptr;
}  // namespace

GpuRuntime* GpuRuntimeOrNull() { return g_runtime; }
void RegisterGpuRuntime(GpuRuntime* runtime) { g_runtime = runtime; }

}  // namespace gyre
