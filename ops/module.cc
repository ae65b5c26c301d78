#include "ops/module.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <vector>

#include "absl/strings/str_cat.h"
#include "ops/parallel.h"

namespace gyre::ops {

Parameter* ParamStore::Create(std::string name, Shape shape, ParamKind kind) {
  for (const Parameter& p : params_) GYRE_CHECK(p.name != name, "duplicate parameter %s", name.c_str());
  Parameter& p = params_.emplace_back();
  p.name = std::move(name);
  p.kind = kind;
  p.value = Tensor::Zeros(shape, dtype_, device_);
  if (!staging_) p.grad = Tensor::Zeros(shape, dtype_, device_);
  if (device_ == Device::kCuda) p.compute = Tensor::Zeros(shape, DType::kBF16, device_);
  GYRE_CHECK(flat_offset_.empty(), "parameter %s created after MoveToDevice", p.name.c_str());
  return &p;
}

std::vector<Parameter*> ParamStore::All() {
  std::vector<Parameter*> out;
  for (Parameter& p : params_) out.push_back(&p);
  return out;
}

std::vector<const Parameter*> ParamStore::All() const {
  std::vector<const Parameter*> out;
  for (const Parameter& p : params_) out.push_back(&p);
  return out;
}

Parameter* ParamStore::Find(const std::string& name) {
  for (Parameter& p : params_) if (p.name == name) return &p;
  return nullptr;
}

int64_t ParamStore::NumParameters() const {
  int64_t n = 0;
  for (const Parameter& p : params_) n += p.value.numel();
  return n;
}

void ParamStore::ZeroGrad() {
  for (Parameter& p : params_) p.grad_stale = false;
  if (device_ == Device::kMeta) return;
  if (flat_grad_.defined()) {
    flat_grad_.SetZero();
    return;
  }
  for (Parameter& p : params_) p.grad.SetZero();
}

void ParamStore::DeferZeroGrad() {
  for (Parameter& p : params_) p.grad_stale = p.defer_zero;
  if (device_ == Device::kMeta) return;
  if (!flat_grad_.defined()) {
    for (Parameter& p : params_)
      if (!p.defer_zero) p.grad.SetZero();
    return;
  }
  // Runs of unmarked parameters are contiguous in the flat buffer (padding included): one memset
  // each. A model with no marked parameter gets the single memset of ZeroGrad.
  const int64_t total = flat_grad_.numel();
  const size_t n = params_.size();
  size_t i = 0;
  while (i < n) {
    if (params_[i].defer_zero) {
      ++i;
      continue;
    }
    size_t j = i;
    while (j < n && !params_[j].defer_zero) ++j;
    const int64_t begin = flat_offset_[i], end = j < n ? flat_offset_[j] : total;
    flat_grad_.Slice(begin, {end - begin}).SetZero();
    i = j;
  }
}

void ParamStore::ZeroStaleGrads(const std::vector<Parameter*>& params) {
  for (Parameter* p : params) ZeroGradIfStale(p);
}

void ParamStore::AllowDeferredZero(const std::vector<Parameter*>& params) {
  for (Parameter* p : params) p->defer_zero = true;
}

bool FirstGradWrite(Parameter* p) {
  const bool first = p->grad_stale;
  p->grad_stale = false;
  return first;
}

bool FirstGradWrite(std::initializer_list<Parameter*> params) {
  bool all = true;
  for (Parameter* p : params) all &= p->grad_stale;
  if (all) {
    for (Parameter* p : params) p->grad_stale = false;
    return params.size() > 0;
  }
  for (Parameter* p : params) ZeroGradIfStale(p);
  return false;
}

void ZeroGradIfStale(Parameter* p) {
  if (!p->grad_stale) return;
  p->grad_stale = false;
  if (p->grad.device() != Device::kMeta) p->grad.SetZero();
}

void ParamStore::MoveToDevice(Device device) {
  GYRE_CHECK(device == Device::kCuda, "MoveToDevice(%s)", DeviceName(device));
  GYRE_CHECK(device_ == Device::kCpu && dtype_ == DType::kF32, "MoveToDevice from %s %s", DeviceName(device_),
             DTypeName(dtype_));
  int64_t total = 0;
  for (const Parameter& p : params_) {
    flat_offset_.push_back(total);
    total += (p.value.numel() + 7) / 8 * 8;
  }
  // One host staging buffer, filled in parallel (padding zeroed), then one copy to the device.
  Tensor host = Tensor::Empty({total}, DType::kF32, Device::kCpu);
  float* host_data = host.data<float>();
  ParallelFor(static_cast<int64_t>(params_.size()), [&](int64_t i) {
    const Parameter& p = params_[static_cast<size_t>(i)];
    const int64_t off = flat_offset_[static_cast<size_t>(i)], n = p.value.numel();
    const int64_t end = static_cast<size_t>(i) + 1 < params_.size() ? flat_offset_[static_cast<size_t>(i) + 1] : total;
    std::copy(p.value.data<float>(), p.value.data<float>() + n, host_data + off);
    std::fill(host_data + off + n, host_data + end, 0.f);
  });
  size_t i = 0;
  flat_value_ = host.ToDevice(device);
  flat_grad_ = Tensor::Zeros({total}, DType::kF32, device);
  flat_compute_ = Tensor::Empty({total}, DType::kBF16, device);
  i = 0;
  for (Parameter& p : params_) {
    const int64_t off = flat_offset_[i++];
    p.value = flat_value_.Slice(off, p.value.shape());
    p.grad = flat_grad_.Slice(off, p.value.shape());
    p.compute = flat_compute_.Slice(off, p.value.shape());
  }
  device_ = device;
  SyncCompute();
}

void ParamStore::SyncCompute() {
  if (device_ != Device::kCuda) return;
  if (flat_value_.defined()) {
    flat_compute_.CopyFrom(flat_value_.To(DType::kBF16));
    return;
  }
  for (Parameter& p : params_) p.compute.CopyFrom(p.value.To(DType::kBF16));
}

bool ParamStore::AdjacentSpan(const std::vector<const Parameter*>& params, Tensor* compute, Tensor* grad) const {
  if (flat_offset_.empty() || params.empty()) return false;
  auto index_of = [&](const Parameter* p) -> int64_t {
    int64_t i = 0;
    for (const Parameter& q : params_) {
      if (&q == p) return i;
      ++i;
    }
    return -1;
  };
  const int64_t cols = params[0]->value.cols();
  int64_t first = index_of(params[0]);
  if (first < 0) return false;
  int64_t next = flat_offset_[first], rows = 0;
  for (const Parameter* p : params) {
    const int64_t i = index_of(p);
    if (i < 0 || flat_offset_[i] != next || p->value.cols() != cols || p->value.rank() != 2) return false;
    next += p->value.numel();
    rows += p->value.rows();
  }
  *compute = flat_compute_.Slice(flat_offset_[first], {rows, cols});
  *grad = flat_grad_.Slice(flat_offset_[first], {rows, cols});
  return true;
}

std::vector<NamedTensor> ParamStore::State() const {
  std::vector<NamedTensor> out;
  for (const Parameter& p : params_) out.push_back({p.name, p.value});
  return out;
}

absl::Status ParamStore::LoadState(const std::vector<NamedTensor>& state) {
  std::map<std::string, const Tensor*> by_name;
  for (const NamedTensor& nt : state) by_name[nt.name] = &nt.tensor;
  for (const Parameter& p : params_) {
    auto it = by_name.find(p.name);
    if (it == by_name.end()) return absl::NotFoundError(absl::StrCat("model state lacks parameter ", p.name));
    if (it->second->shape() != p.value.shape()) {
      return absl::InvalidArgumentError(absl::StrCat("parameter ", p.name, " is ", ShapeString(it->second->shape()),
                                                     " in the state, ", ShapeString(p.value.shape()), " in the model"));
    }
    if (it->second->dtype() != DType::kF32 && it->second->dtype() != DType::kF64) {
      return absl::InvalidArgumentError(absl::StrCat("parameter ", p.name, " has dtype ", DTypeName(it->second->dtype())));
    }
  }
  for (Parameter& p : params_) {
    const Tensor& src = *by_name[p.name];
    if (src.dtype() == p.value.dtype()) p.value.CopyFrom(src);
    else if (src.device() == Device::kCpu) p.value.CopyFrom(src.To(p.value.dtype()));
    else p.value.CopyFrom(src.ToDevice(Device::kCpu).To(p.value.dtype()));
  }
  SyncCompute();
  return absl::OkStatus();
}

// Initialisers draw on the host (the same stream on every device) and copy.
//
// The draws are counter-based per chunk: the caller's generator gives one key per tensor, and
// chunk c of the tensor draws from its own generator seeded by (key, c). So chunks run in
// parallel with no serial pass over the elements, and the values depend only on the seed and the
// order in which tensors are initialised, never on the thread count. (A 1.3B-parameter model's
// initialisation was a serial walk of the generator plus one Box-Muller transform per value;
// start-up of every replacement worker paid it.)
namespace {

constexpr int64_t kInitChunk = int64_t{1} << 16;

// Fills t (CPU) chunk by chunk: draw(r, out, m) writes m values from generator r.
template <typename DrawChunk>
void FillCounterBased(Tensor* t, Rng* rng, DrawChunk draw) {
  const uint64_t key = rng->Next();
  const int64_t n = t->numel();
  const int64_t chunks = (n + kInitChunk - 1) / kInitChunk;
  const DType dtype = t->dtype();
  void* base = t->raw();
  ParallelFor(chunks, [&](int64_t c) {
    // Odd-constant multiply: distinct chunks get well-separated SplitMix64 seeds.
    Rng r(key ^ (static_cast<uint64_t>(c) * 0xd1b54a32d192ed03ULL));
    const int64_t begin = c * kInitChunk, m = std::min(kInitChunk, n - begin);
    std::vector<double> values(static_cast<size_t>(m));
    draw(&r, values.data(), m);
    if (dtype == DType::kF32) {
      float* out = static_cast<float*>(base) + begin;
      for (int64_t i = 0; i < m; ++i) out[i] = static_cast<float>(values[i]);
    } else if (dtype == DType::kF64) {
      std::copy(values.begin(), values.end(), static_cast<double*>(base) + begin);
    } else {
      for (int64_t i = 0; i < m; ++i) t->Set(begin + i, values[i]);
    }
  });
}

// A CUDA tensor is initialised in a host tensor and copied; returns false for other devices.
template <typename Init>
bool InitThroughHost(Tensor* t, Init init) {
  if (t->device() != Device::kCuda) return false;
  Tensor host = Tensor::Empty(t->shape(), t->dtype(), Device::kCpu);
  init(&host);
  t->CopyFrom(host);
  return true;
}

}  // namespace

void InitNormal(Tensor* t, double stddev, Rng* rng) {
  if (t->device() == Device::kMeta) return;
  if (InitThroughHost(t, [&](Tensor* host) { InitNormal(host, stddev, rng); })) return;
  // Box-Muller in single precision, both outputs of each pair: u1 in (0, 1] on a 2^-24 grid, so
  // the draws reach 5.8 standard deviations (ample for initial weights) at a third of the cost of
  // the double-precision transcendental functions.
  FillCounterBased(t, rng, [stddev](Rng* r, double* out, int64_t m) {
    const float scale = static_cast<float>(stddev);
    for (int64_t i = 0; i < m; i += 2) {
      const float u1 = static_cast<float>((r->Next() >> 40) + 1) * 0x1.0p-24f;
      const float u2 = static_cast<float>(r->Next() >> 40) * 0x1.0p-24f;
      const float radius = scale * std::sqrt(-2.0f * std::log(u1));
      float sin_a, cos_a;
      ::sincosf(6.2831853f * u2, &sin_a, &cos_a);
      out[i] = radius * cos_a;
      if (i + 1 < m) out[i + 1] = radius * sin_a;
    }
  });
}

void InitUniform(Tensor* t, double lo, double hi, Rng* rng) {
  if (t->device() == Device::kMeta) return;
  if (InitThroughHost(t, [&](Tensor* host) { InitUniform(host, lo, hi, rng); })) return;
  FillCounterBased(t, rng, [lo, hi](Rng* r, double* out, int64_t m) {
    for (int64_t i = 0; i < m; ++i) out[i] = r->Uniform(lo, hi);
  });
}

void InitConstant(Tensor* t, double value) {
  if (t->device() == Device::kMeta) return;
  t->Fill(value);
}

}  // namespace gyre::ops
