#include "ops/module.h"

#include <map>

#include "absl/strings/str_cat.h"

namespace gyre::ops {

Parameter* ParamStore::Create(std::string name, Shape shape, ParamKind kind) {
  for (const Parameter& p : params_) GYRE_CHECK(p.name != name, "duplicate parameter %s", name.c_str());
  Parameter& p = params_.emplace_back();
  p.name = std::move(name);
  p.kind = kind;
  p.value = Tensor::Zeros(shape, dtype_, device_);
  p.grad = Tensor::Zeros(shape, dtype_, device_);
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
  if (device_ == Device::kMeta) return;
  for (Parameter& p : params_) p.grad.SetZero();
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
    else p.value.CopyFrom(src.To(p.value.dtype()));
  }
  return absl::OkStatus();
}

void InitNormal(Tensor* t, double stddev, Rng* rng) {
  if (t->device() == Device::kMeta) return;
  for (int64_t i = 0; i < t->numel(); ++i) t->Set(i, stddev * rng->Normal());
}

void InitUniform(Tensor* t, double lo, double hi, Rng* rng) {
  if (t->device() == Device::kMeta) return;
  for (int64_t i = 0; i < t->numel(); ++i) t->Set(i, rng->Uniform(lo, hi));
}

void InitConstant(Tensor* t, double value) {
  if (t->device() == Device::kMeta) return;
  t->Fill(value);
}

}  // namespace gyre::ops
