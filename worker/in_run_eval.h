// In-run evaluation (train.eval_every_steps): every N committed steps, before step N runs, rank 0
// scores the current parameters on held-out windows of the index's "validation" sources (the
// "test" split is left for the final `gyre eval`) and takes the LM head's spectrum (MODELS.md
// section 7). The result rides on that step's CompleteStep metrics, so the coordinator journals
// it with the step and watches it for saturation.
//
// Windows and loss: eval/perplexity.h (fixed seeded windows per source, independent of the
// training order), train.eval_samples_per_source of them, batch of 4, the run's context. Spectrum:
// eval/spectrum.h on a host copy of the head (the tied embedding when the head is tied), W-error at
// r = min(64, d), the first 8 relative singular values.
//
// Cost: a forward over samples_per_source x sources windows plus O(V d²) on the host for the
// spectrum, on rank 0 only while the other ranks wait in the step's collective: keep the cadence
// well above the collective timeout's worth of evaluations.
#pragma once

#include <cstdint>

#include "absl/status/statusor.h"
#include "base/env.h"
#include "dataloader/token_index.h"
#include "gyre/v1/cluster.pb.h"
#include "gyre/v1/config.pb.h"
#include "ops/model.h"

namespace gyre {

// Whether step `step` is preceded by an evaluation under `train` (never before step 0).
bool EvalDueBefore(const gyre::v1::TrainConfig& train, uint64_t step);

// FailedPrecondition when the index has no validation source (the caller turns evaluation off
// and says so once, rather than failing the run).
absl::StatusOr<gyre::v1::EvalResult> RunInRunEval(Env* env, const data::TokenIndex& index,
                                                   ops::LanguageModel* model, const gyre::v1::RunConfig& config,
                                                   uint64_t step);

}  // namespace gyre
