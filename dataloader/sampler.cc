#include "dataloader/sampler.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "base/status_macros.h"
#include "dataloader/permutation.h"
#include "xxhash.h"

namespace gyre::data {

SampleRange RankSlice(uint64_t step, uint64_t global_batch, uint32_t world, uint32_t rank) {
  SampleRange r;
  if (world == 0 || rank >= world) return r;
  const uint64_t base = global_batch / world;
  const uint64_t rem = global_batch % world;
  r.count = base + (rank < rem ? 1 : 0);
  r.first = step * global_batch + rank * base + std::min<uint64_t>(rank, rem);
  return r;
}

SamplerOptions SamplerOptionsFromConfig(const gyre::v1::RunConfig& config) {
  SamplerOptions o;
  o.seed = config.seed();
  if (config.data().seq_len() > 0) o.seq_len = config.data().seq_len();
  if (config.data().mix_block() > 0) o.mix_block = config.data().mix_block();
  for (const auto& w : config.data().weights()) o.weights[w.source()] = w.weight();
  return o;
}

absl::StatusOr<std::unique_ptr<SourceTokens>> OpenSourceTokens(Env* env, const TokenIndex& index,
                                                               const std::string& source,
                                                               bool verify_checksums) {
  ASSIGN_OR_RETURN(auto meta, index.ReadMeta());
  if (!meta.has_value()) {
    return absl::FailedPreconditionError("token index " + index.dir() + " has no meta record");
  }
  ASSIGN_OR_RETURN(auto shards, index.ListShards(source));
  if (shards.empty()) {
    return absl::NotFoundError(absl::StrCat("token index ", index.dir(), " has no source '",
                                            source, "'"));
  }
  return SourceTokens::Open(env, index.dir(), std::move(shards), meta->tokenizer_fingerprint(),
                            verify_checksums);
}

uint64_t HashTokens(std::span<const uint32_t> tokens) {
  return XXH3_64bits(tokens.data(), tokens.size() * sizeof(uint32_t));
}

// ---------------------------------------------------------------------------------------------
// MixSchedule

absl::StatusOr<MixSchedule> MixSchedule::Create(const std::vector<SourceInfo>& sources,
                                                const SamplerOptions& options) {
  if (options.seq_len == 0) return absl::InvalidArgumentError("data.seq_len must be positive");
  if (options.mix_block == 0) return absl::InvalidArgumentError("data.mix_block must be positive");
  const uint32_t L = options.seq_len;
  const uint32_t K = options.mix_block;

  std::vector<SourceInfo> train;
  std::map<std::string, const SourceInfo*> by_name;
  for (const SourceInfo& s : sources) {
    by_name[s.name] = &s;
    if (!s.validation) train.push_back(s);
  }
  std::sort(train.begin(), train.end(),
            [](const SourceInfo& a, const SourceInfo& b) { return a.name < b.name; });
  for (const auto& [name, w] : options.weights) {
    auto it = by_name.find(name);
    if (it == by_name.end()) {
      std::vector<std::string> names;
      for (const auto& s : train) names.push_back(s.name);
      return absl::InvalidArgumentError(absl::StrCat("data.weights: unknown source '", name,
                                                     "' (training sources: ",
                                                     absl::StrJoin(names, ", "), ")"));
    }
    if (it->second->validation) {
      return absl::InvalidArgumentError(absl::StrCat("data.weights: '", name,
                                                     "' is a validation source; validation "
                                                     "sources are never mixed into training"));
    }
    if (!(w >= 0) || !std::isfinite(w)) {
      return absl::InvalidArgumentError(absl::StrCat("data.weights: weight of '", name, "' is ",
                                                     w, "; weights must be finite and >= 0"));
    }
  }
  long double train_tokens = 0;
  for (const auto& s : train) train_tokens += s.tokens;

  MixSchedule m;
  m.seq_len_ = L;
  m.mix_block_ = K;
  m.seed_ = options.seed;
  double weight_sum = 0;
  for (const SourceInfo& s : train) {
    const uint64_t n = s.tokens >= 1 ? (s.tokens - 1) / L : 0;
    auto over = options.weights.find(s.name);
    double w = over != options.weights.end()
                   ? over->second
                   : (train_tokens > 0 ? static_cast<double>(s.tokens / train_tokens) : 0.0);
    if (n == 0) {
      if (over != options.weights.end() && w > 0) {
        return absl::InvalidArgumentError(absl::StrCat(
            "data.weights: source '", s.name, "' has ", s.tokens,
            " tokens, fewer than one sequence of seq_len + 1 = ", L + 1));
      }
      continue;
    }
    if (w <= 0) continue;
    Source src;
    src.name = s.name;
    src.tokens = s.tokens;
    src.sequences = n;
    src.weight = w;
    src.key = XXH64(s.name.data(), s.name.size(), 0);
    m.sources_.push_back(src);
    weight_sum += w;
  }
  if (m.sources_.empty()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "no training source can supply a sequence of ", L + 1,
        " tokens with a positive weight (sources: ", sources.size(), ")"));
  }
  if (m.sources_.size() > K) {
    return absl::InvalidArgumentError(absl::StrCat("data.mix_block ", K, " is smaller than the ",
                                                   m.sources_.size(), " sources in the mix"));
  }
  // Largest remainder (Hamilton) apportionment of K slots; ties by name order (stable sort).
  std::vector<double> quota(m.sources_.size());
  uint32_t assigned = 0;
  for (size_t i = 0; i < m.sources_.size(); ++i) {
    m.sources_[i].weight /= weight_sum;
    quota[i] = m.sources_[i].weight * K;
    m.sources_[i].per_block = static_cast<uint32_t>(std::floor(quota[i]));
    assigned += m.sources_[i].per_block;
  }
  std::vector<size_t> order(m.sources_.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    return quota[a] - std::floor(quota[a]) > quota[b] - std::floor(quota[b]);
  });
  for (size_t i = 0; assigned < K; i = (i + 1) % order.size(), ++assigned) {
    m.sources_[order[i]].per_block += 1;
  }
  // Every source in the mix gets at least one slot, taken from the largest.
  for (auto& s : m.sources_) {
    if (s.per_block == 0) {
      auto largest = std::max_element(m.sources_.begin(), m.sources_.end(),
                                      [](const Source& a, const Source& b) {
                                        return a.per_block < b.per_block;
                                      });
      largest->per_block -= 1;
      s.per_block = 1;
    }
  }
  m.owner_of_slot_.resize(K);
  uint32_t at = 0;
  for (uint32_t i = 0; i < m.sources_.size(); ++i) {
    m.sources_[i].block_start = at;
    for (uint32_t k = 0; k < m.sources_[i].per_block; ++k) m.owner_of_slot_[at++] = i;
  }
  return m;
}

SampleAddress MixSchedule::Locate(uint64_t g) const {
  const uint64_t block = g / mix_block_;
  const uint64_t slot = g % mix_block_;
  const KeyedPermutation block_order(mix_block_, HashCombine(HashCombine(seed_, 0x6d6978ULL), block));
  const uint64_t p = block_order(slot);
  const uint32_t s = owner_of_slot_[p];
  const Source& src = sources_[s];
  const uint64_t counter = block * src.per_block + (p - src.block_start);
  SampleAddress a;
  a.global = g;
  a.source = s;
  a.epoch = counter / src.sequences;
  a.sequence = counter % src.sequences;
  const KeyedPermutation perm(src.sequences, HashCombine(HashCombine(seed_, src.key), a.epoch));
  a.start_token = perm(a.sequence) * seq_len_;
  return a;
}

std::string MixSchedule::Describe() const {
  std::string out;
  for (const Source& s : sources_) {
    absl::StrAppendFormat(&out, "%-28s weight %.4f  %u/%u per block  %u sequences of %u\n",
                          s.name, s.weight, s.per_block, mix_block_, s.sequences, seq_len_);
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// SourceTokens

SourceTokens::~SourceTokens() = default;

absl::StatusOr<std::unique_ptr<SourceTokens>> SourceTokens::Open(
    Env* env, const std::string& index_dir, std::vector<gyre::v1::ShardRecord> shards,
    uint64_t tokenizer_fingerprint, bool verify_checksums, size_t max_open_shards) {
  std::unique_ptr<SourceTokens> t(new SourceTokens());
  t->env_ = env;
  t->index_dir_ = index_dir;
  t->fingerprint_ = tokenizer_fingerprint;
  t->verify_ = verify_checksums;
  t->max_open_ = std::max<size_t>(1, max_open_shards);
  for (const auto& rec : shards) {
    if (rec.first_token() != t->total_) {
      return absl::DataLossError(absl::StrCat("index ", index_dir, ": shard ", rec.path(),
                                              " starts at token ", rec.first_token(),
                                              " but the shards before it hold ", t->total_));
    }
    t->first_token_.push_back(t->total_);
    t->total_ += rec.tokens();
  }
  t->records_ = std::move(shards);
  absl::MutexLock lock(&t->mu_);
  t->open_.resize(t->records_.size());
  return t;
}

size_t SourceTokens::open_shards() const {
  absl::MutexLock lock(&mu_);
  return open_count_;
}

absl::StatusOr<std::shared_ptr<const ShardReader>> SourceTokens::Shard(size_t i) const {
  absl::MutexLock lock(&mu_);
  if (open_[i]) return open_[i];
  const gyre::v1::ShardRecord& rec = records_[i];
  const std::string path = JoinPath(index_dir_, rec.path());
  ShardReader::OpenOptions opts;
  opts.verify_checksum = verify_;
  opts.expect_tokenizer_fingerprint = fingerprint_;
  ASSIGN_OR_RETURN(std::unique_ptr<ShardReader> reader, ShardReader::Open(env_, path, opts));
  if (reader->tokens() != rec.tokens() || reader->header().dtype_bytes != rec.dtype_bytes() ||
      reader->header().payload_checksum != rec.payload_checksum()) {
    return absl::DataLossError(absl::StrCat(
        "shard ", path, " does not match its index record (tokens ", reader->tokens(), " vs ",
        rec.tokens(), ", dtype ", reader->header().dtype_bytes, " vs ", rec.dtype_bytes(),
        ", checksum ", absl::Hex(reader->header().payload_checksum), " vs ",
        absl::Hex(rec.payload_checksum()), ")"));
  }
  // Bounded: evict another mapped shard round-robin (readers holding it keep it alive).
  while (open_count_ >= max_open_) {
    evict_cursor_ = (evict_cursor_ + 1) % open_.size();
    if (evict_cursor_ != i && open_[evict_cursor_]) {
      open_[evict_cursor_].reset();
      --open_count_;
    }
  }
  open_[i] = std::shared_ptr<const ShardReader>(std::move(reader));
  ++open_count_;
  return open_[i];
}

absl::Status SourceTokens::Read(uint64_t begin, std::span<uint32_t> out) const {
  if (begin > total_ || out.size() > total_ - begin) {
    return absl::OutOfRangeError(absl::StrCat("read tokens [", begin, ", ", begin + out.size(),
                                              ") of a source with ", total_));
  }
  size_t i = std::upper_bound(first_token_.begin(), first_token_.end(), begin) -
             first_token_.begin() - 1;
  size_t done = 0;
  while (done < out.size()) {
    ASSIGN_OR_RETURN(std::shared_ptr<const ShardReader> shard, Shard(i));
    const uint64_t offset = begin + done - first_token_[i];
    const size_t n = std::min<uint64_t>(out.size() - done, shard->tokens() - offset);
    shard->ReadUnchecked(offset, out.data() + done, n);
    done += n;
    ++i;
  }
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------------------------
// Sampler

absl::StatusOr<std::unique_ptr<Sampler>> Sampler::Open(Env* env, const TokenIndex& index,
                                                      const SamplerOptions& options,
                                                      const OpenOptions& open_options) {
  ASSIGN_OR_RETURN(auto meta, index.ReadMeta());
  if (!meta.has_value()) {
    return absl::FailedPreconditionError("token index " + index.dir() + " has no meta record");
  }
  ASSIGN_OR_RETURN(auto records, index.ListSources());
  std::vector<SourceInfo> infos;
  for (const auto& r : records) infos.push_back({r.name(), r.tokens(), r.validation()});
  ASSIGN_OR_RETURN(MixSchedule schedule, MixSchedule::Create(infos, options));
  std::unique_ptr<Sampler> sampler(new Sampler(std::move(schedule)));
  for (const auto& src : sampler->schedule_.sources()) {
    ASSIGN_OR_RETURN(auto shards, index.ListShards(src.name));
    ASSIGN_OR_RETURN(auto tokens, SourceTokens::Open(env, index.dir(), std::move(shards),
                                                     meta->tokenizer_fingerprint(),
                                                     open_options.verify_checksums,
                                                     open_options.max_open_shards_per_source));
    if (tokens->tokens() != src.tokens) {
      return absl::DataLossError(absl::StrCat("index ", index.dir(), ": source '", src.name,
                                              "' records ", src.tokens, " tokens but its shards hold ",
                                              tokens->tokens()));
    }
    sampler->tokens_.push_back(std::move(tokens));
  }
  return sampler;
}

absl::Status Sampler::Read(uint64_t g, std::span<uint32_t> out) const {
  return ReadAt(schedule_.Locate(g), out);
}

absl::Status Sampler::ReadRange(SampleRange range, std::span<uint32_t> out) const {
  const size_t row = schedule_.seq_len() + size_t{1};
  if (out.size() != range.count * row) {
    return absl::InvalidArgumentError(absl::StrCat("batch buffer holds ", out.size(),
                                                   " tokens; ", range.count, " samples of ", row,
                                                   " need ", range.count * row));
  }
  for (uint64_t k = 0; k < range.count; ++k) {
    absl::Status st = Read(range.first + k, out.subspan(k * row, row));
    if (!st.ok()) {
      return absl::Status(st.code(), absl::StrCat("global sample ", range.first + k, ": ",
                                                  st.message()));
    }
  }
  return absl::OkStatus();
}

absl::Status Sampler::ReadAt(const SampleAddress& address, std::span<uint32_t> out) const {
  if (out.size() != schedule_.seq_len() + size_t{1}) {
    return absl::InvalidArgumentError(absl::StrCat("sample buffer holds ", out.size(),
                                                   " tokens; seq_len + 1 = ",
                                                   schedule_.seq_len() + 1));
  }
  return tokens_[address.source]->Read(address.start_token, out);
}

}  // namespace gyre::data
