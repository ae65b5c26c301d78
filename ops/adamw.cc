#include "ops/adamw.h"

#include <cmath>
#include <map>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "ops/parallel.h"

namespace gyre::ops {

AdamW::AdamW(ParamStore* params, AdamWOptions options) : params_(params), options_(options) {
  list_ = params_->All();
  for (Parameter* p : list_) {
    m_.push_back(Tensor::ZerosLike(p->value));
    v_.push_back(Tensor::ZerosLike(p->value));
  }
  if (params_->device() == Device::kCuda) {
    std::vector<CudaAdamWTensor> tensors;
    for (size_t i = 0; i < list_.size(); ++i) {
      Parameter* p = list_[i];
      GYRE_CHECK(p->value.dtype() == DType::kF32, "CUDA AdamW needs f32 masters (%s)", p->name.c_str());
      CudaAdamWTensor t;
      t.master = p->value.data<float>();
      t.grad = p->grad.data<float>();
      t.m = m_[i].data<float>();
      t.v = v_[i].data<float>();
      t.compute = p->compute.defined() ? p->compute.raw() : nullptr;
      t.numel = p->value.numel();
      t.decay = Decays(*p);
      tensors.push_back(t);
    }
    cuda_ = Cuda().NewAdamW(tensors, options_.beta1, options_.beta2, options_.eps, options_.weight_decay);
  }
}

double AdamW::ClipAndStep(double lr, double max_norm) {
  GYRE_CHECK(cuda_ != nullptr, "ClipAndStep is the CUDA path");
  const double norm = cuda_->Step(lr, max_norm);
  t_ = cuda_->steps_taken();
  return norm;
}

void AdamW::Step(double lr) {
  if (cuda_ != nullptr) {
    ClipAndStep(lr, 0.0);
    return;
  }
  ++t_;
  const double b1 = options_.beta1, b2 = options_.beta2;
  const double bc1 = 1.0 - std::pow(b1, static_cast<double>(t_));
  const double bc2 = 1.0 - std::pow(b2, static_cast<double>(t_));
  ParallelFor(static_cast<int64_t>(list_.size()), [&](int64_t idx) {
    Parameter* p = list_[idx];
    CheckCpu(p->value, "adamw");
    const double decay = Decays(*p) ? lr * options_.weight_decay : 0.0;
    DispatchFloat(p->value.dtype(), [&]<typename T>() {
      T* w = p->value.data<T>();
      const T* g = p->grad.data<T>();
      T* m = m_[idx].data<T>();
      T* v = v_[idx].data<T>();
      for (int64_t i = 0; i < p->value.numel(); ++i) {
        const double gi = g[i];
        const double mi = b1 * m[i] + (1.0 - b1) * gi;
        const double vi = b2 * v[i] + (1.0 - b2) * gi * gi;
        m[i] = static_cast<T>(mi);
        v[i] = static_cast<T>(vi);
        double wi = w[i] * (1.0 - decay);
        wi -= lr * (mi / bc1) / (std::sqrt(vi / bc2) + options_.eps);
        w[i] = static_cast<T>(wi);
      }
    });
  });
}

std::vector<NamedTensor> AdamW::State() const {
  std::vector<NamedTensor> out;
  for (size_t i = 0; i < list_.size(); ++i) {
    out.push_back({"adam.m." + list_[i]->name, m_[i]});
    out.push_back({"adam.v." + list_[i]->name, v_[i]});
  }
  Tensor step = Tensor::Empty({1}, DType::kF64);
  step.Set(0, static_cast<double>(t_));
  out.push_back({"adam.step", step});
  return out;
}

absl::Status AdamW::LoadState(const std::vector<NamedTensor>& state) {
  std::map<std::string, const Tensor*> by_name;
  for (const NamedTensor& nt : state) by_name[nt.name] = &nt.tensor;
  auto get = [&](const std::string& name, const Tensor& like) -> absl::StatusOr<const Tensor*> {
    auto it = by_name.find(name);
    if (it == by_name.end()) return absl::NotFoundError(absl::StrCat("optimizer state lacks ", name));
    if (it->second->shape() != like.shape() || it->second->dtype() != like.dtype()) {
      return absl::InvalidArgumentError(absl::StrCat("optimizer state ", name, " is ", ShapeString(it->second->shape()),
                                                     " ", DTypeName(it->second->dtype()), ", expected ",
                                                     ShapeString(like.shape()), " ", DTypeName(like.dtype())));
    }
    return it->second;
  };
  // Validate everything before changing anything.
  std::vector<const Tensor*> ms, vs;
  for (size_t i = 0; i < list_.size(); ++i) {
    auto m = get("adam.m." + list_[i]->name, m_[i]);
    if (!m.ok()) return m.status();
    auto v = get("adam.v." + list_[i]->name, v_[i]);
    if (!v.ok()) return v.status();
    ms.push_back(*m);
    vs.push_back(*v);
  }
  auto step = by_name.find("adam.step");
  if (step == by_name.end() || step->second->numel() != 1) return absl::NotFoundError("optimizer state lacks adam.step");
  const double t = step->second->At(0);
  if (!(t >= 0) || t != std::floor(t)) return absl::InvalidArgumentError(absl::StrCat("adam.step = ", t));
  for (size_t i = 0; i < list_.size(); ++i) {
    m_[i].CopyFrom(*ms[i]);
    v_[i].CopyFrom(*vs[i]);
  }
  t_ = static_cast<int64_t>(t);
  if (cuda_ != nullptr) cuda_->SetStepsTaken(t_);  // FusedAdamW keeps its own count
  return absl::OkStatus();
}

}  // namespace gyre::ops
