#include "cli/train_flags.h"

#include "base/status_macros.h"

namespace gyre::cli {

void AddTrainFlags(CLI::App* app, TrainFlags* f) {
  app->add_option("--preset", f->preset, "model preset (" + [] {
    std::string s;
    for (const auto& n : ops::PresetNames()) s += (s.empty() ? "" : ", ") + n;
    return s;
  }() + ")")->capture_default_str();
  app->add_option("--steps", f->steps, "optimizer steps")->capture_default_str();
  app->add_option("--lr", f->lr, "peak learning rate")->capture_default_str();
  app->add_option("--warmup", f->warmup, "linear warm-up steps (cosine to 10% of peak at --steps)")->capture_default_str();
  app->add_option("--weight-decay", f->weight_decay, "AdamW decoupled weight decay")->capture_default_str();
  app->add_option("--grad-clip", f->grad_clip, "global gradient-norm clip (<= 0: off)")->capture_default_str();
  app->add_option("--mtp-heads", f->mtp_heads, "multi-token prediction heads (1 = next token only)")->capture_default_str();
  app->add_flag("--recompute", f->recompute, "recompute block activations in backward (model.recompute_blocks)");
  // No CLI11 value check here on purpose: the value goes to model.xlstm.mlstm_recompute and the
  // config's validation (ops::ResolveModelConfig) judges it, as it does for a config file.
  app->add_option("--mlstm_recompute,--mlstm-recompute", f->mlstm_recompute,
                  "what an mLSTM block keeps for its backward on CUDA: none | states | glue | cell "
                  "(model.xlstm.mlstm_recompute; not with --recompute)");
  app->add_option("--mlstm_keep_last,--mlstm-keep-last", f->mlstm_keep_last,
                  "with --mlstm_recompute: the last N mLSTM layers keep everything; -1: as many as "
                  "fit the device (model.xlstm.mlstm_recompute_keep_last)");
  app->add_flag("--deterministic", f->deterministic,
                "bitwise-repeatable CUDA steps; attention's backward sums dQ in a fixed order (train.deterministic)");
}

TrainFlagConfig TrainFlagsToConfig(const TrainFlags& f) {
  TrainFlagConfig c;
  c.model.set_preset(f.preset);
  c.model.set_mtp_heads(f.mtp_heads);
  c.model.set_recompute_blocks(f.recompute);
  if (!f.mlstm_recompute.empty()) c.model.mutable_xlstm()->set_mlstm_recompute(f.mlstm_recompute);
  if (f.mlstm_keep_last != 0)
    c.model.mutable_xlstm()->set_mlstm_recompute_keep_last(static_cast<int32_t>(f.mlstm_keep_last));
  c.optimizer.set_lr(f.lr);
  c.optimizer.set_weight_decay(f.weight_decay);
  c.optimizer.set_grad_clip(f.grad_clip <= 0 ? -1 : f.grad_clip);
  c.schedule.set_warmup_steps(f.warmup);
  c.schedule.set_total_steps(f.steps);
  c.train.set_max_steps(f.steps);
  c.train.set_deterministic(f.deterministic);
  return c;
}

absl::StatusOr<ResolvedTrain> ResolveTrainConfig(const TrainFlagConfig& c) {
  ResolvedTrain r;
  ASSIGN_OR_RETURN(r.spec, ops::ResolveModelConfig(c.model));
  r.spec.deterministic = c.train.deterministic();
  ASSIGN_OR_RETURN(r.options, ops::TrainOptionsFromConfig(c.optimizer, c.schedule));
  return r;
}

}  // namespace gyre::cli
