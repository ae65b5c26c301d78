#include "ops/cuda_infer.h"

#include <atomic>
#include <string>

#include "ops/check.h"
#include "ops/env_switch.h"

namespace gyre::ops {
namespace {

std::atomic<CudaInference*> g_infer{nullptr};

}  // namespace

CudaInference* CudaInferenceOrNull() { return g_infer.load(std::memory_order_acquire); }

CudaInference& CudaInfer() {
  CudaInference* p = CudaInferenceOrNull();
  GYRE_CHECK(p != nullptr, "CUDA inference ops used, but this binary does not link //ops:cuda_infer_impl");
  return *p;
}

bool RowInvariantDecode() {
  static const bool on = EnvChoice("GYRE_ROW_INVARIANT_DECODE", {"0", "1"}, "1") == "1";
  return on;
}

namespace {

bool& DecodeQkvSwitch() {
  static bool on = EnvChoice("GYRE_DECODE_QKV", {"0", "1"}, "1") == "1";
  return on;
}

}  // namespace

bool DecodeQkvOneLaunch() { return DecodeQkvSwitch(); }
void SetDecodeQkvOneLaunch(bool on) { DecodeQkvSwitch() = on; }

namespace {

bool& DecodeRopeAppendSwitch() {
  static bool on = EnvChoice("GYRE_DECODE_ROPE_APPEND", {"0", "1"}, "1") == "1";
  return on;
}

}  // namespace

bool DecodeRopeAppendOneLaunch() { return DecodeRopeAppendSwitch(); }
void SetDecodeRopeAppendOneLaunch(bool on) { DecodeRopeAppendSwitch() = on; }

namespace {

// 0 serial, 1 split, 2 cluster.
int& DecodeAttnSwitch() {
  static int kernel = [] {
    const std::string v = EnvChoice("GYRE_DECODE_ATTN", {"serial", "split", "cluster"}, "split");
    return v == "serial" ? 0 : v == "split" ? 1 : 2;
  }();
  return kernel;
}

}  // namespace

bool DecodeAttnSplit() { return DecodeAttnSwitch() >= 1; }
void SetDecodeAttnSplit(bool on) { DecodeAttnSwitch() = on ? 1 : 0; }
bool DecodeAttnCluster() { return DecodeAttnSwitch() == 2; }
void SetDecodeAttnCluster(bool on) { DecodeAttnSwitch() = on ? 2 : 1; }

namespace {

int& GemmRowsWarpsSwitch() {
  static int warps = std::stoi(EnvChoice("GYRE_GEMM_ROWS_WARPS", {"1", "2", "4"}, "2"));
  return warps;
}

}  // namespace

int GemmRowsWarps() { return GemmRowsWarpsSwitch(); }

void SetGemmRowsWarps(int warps) {
  GYRE_CHECK(warps == 1 || warps == 2 || warps == 4, "GemmRows warps a column: 1, 2 or 4, got %d", warps);
  GemmRowsWarpsSwitch() = warps;
}

void RegisterCudaInference(CudaInference* impl) { g_infer.store(impl, std::memory_order_release); }

}  // namespace gyre::ops
