#include "worker/checkpoint.h"

#include <algorithm>
#include <functional>
#include <optional>
#include <random>

#include "base/fault_injection_env.h"
#include "base/mem_env.h"
#include "gtest/gtest.h"

namespace gyre {
namespace {

CheckpointState MakeState(uint64_t step, uint32_t seed) {
  std::mt19937 rng(seed);
  CheckpointState s;
  s.step = step;
  s.generation = 4;
  s.config.set_name("unit");
  s.rng_state = "rng-" + std::to_string(seed);
  for (int i = 0; i < 3; ++i) {
    TensorSnapshot t;
    t.name = "blocks." + std::to_string(i) + ".weight";
    t.shape = {17, uint64_t(3 + i)};
    t.bytes.resize(17 * (3 + i) * sizeof(float));
    for (char& c : t.bytes) c = static_cast<char>(rng());
    s.tensors.push_back(std::move(t));
  }
  return s;
}

void ExpectSame(const CheckpointState& a, const CheckpointState& b) {
  EXPECT_EQ(a.step, b.step);
  EXPECT_EQ(a.generation, b.generation);
  EXPECT_EQ(a.rng_state, b.rng_state);
  EXPECT_EQ(a.config.name(), b.config.name());
  ASSERT_EQ(a.tensors.size(), b.tensors.size());
  for (size_t i = 0; i < a.tensors.size(); ++i) {
    EXPECT_EQ(a.tensors[i].name, b.tensors[i].name);
    EXPECT_EQ(a.tensors[i].shape, b.tensors[i].shape);
    EXPECT_EQ(a.tensors[i].data(), b.tensors[i].data());
  }
}

TEST(CheckpointTest, RoundTripAcrossSeveralFiles) {
  auto env = NewMemEnv();
  CheckpointState s = MakeState(12, 1);
  auto dir = WriteCheckpoint(env.get(), "/run/checkpoints", s, /*max_file_bytes=*/300);
  ASSERT_TRUE(dir.ok()) << dir.status();
  EXPECT_EQ(*dir, "/run/checkpoints/step-12");
  auto names = env->ListDir(*dir);
  EXPECT_GE(names->size(), 3u);  // MANIFEST + at least two state files
  auto back = ReadCheckpoint(env.get(), *dir);
  ASSERT_TRUE(back.ok()) << back.status();
  ExpectSame(s, *back);
}

TEST(CheckpointTest, CorruptNewestFallsBackToPreviousAndNamesTheFile) {
  auto mem = NewMemEnv();
  FaultInjectionEnv env(mem.get());
  ASSERT_TRUE(WriteCheckpoint(&env, "/c", MakeState(10, 1)).ok());
  ASSERT_TRUE(WriteCheckpoint(&env, "/c", MakeState(20, 2)).ok());
  ASSERT_TRUE(env.FlipByte("/c/step-20/state-0.bin", 5).ok());
  auto latest = LoadLatestCheckpoint(&env, "/c");
  ASSERT_TRUE(latest.ok()) << latest.status();
  EXPECT_EQ(latest->state.step, 10u);
  ASSERT_EQ(latest->skipped.size(), 1u);
  EXPECT_NE(latest->skipped[0].find("state-0.bin"), std::string::npos) << latest->skipped[0];
  EXPECT_NE(latest->skipped[0].find("checksum"), std::string::npos);
  ExpectSame(MakeState(10, 1), latest->state);
}

TEST(CheckpointTest, TornCheckpointMissingAFileIsSkipped) {
  auto env = NewMemEnv();
  ASSERT_TRUE(WriteCheckpoint(env.get(), "/c", MakeState(1, 1)).ok());
  ASSERT_TRUE(WriteCheckpoint(env.get(), "/c", MakeState(2, 2)).ok());
  ASSERT_TRUE(env->RemoveFile("/c/step-2/state-0.bin").ok());
  auto latest = LoadLatestCheckpoint(env.get(), "/c");
  ASSERT_TRUE(latest.ok());
  EXPECT_EQ(latest->state.step, 1u);
  // A manifest that does not parse is data loss too.
  auto f = env->NewWritableFile("/c/step-1/MANIFEST");
  ASSERT_TRUE((*f)->Append("garbage").ok());
  auto none = LoadLatestCheckpoint(env.get(), "/c");
  EXPECT_TRUE(absl::IsNotFound(none.status())) << none.status();
  EXPECT_TRUE(absl::IsDataLoss(ReadCheckpoint(env.get(), "/c/step-1").status()));
}

// Kill the writer at every mutation point of a second checkpoint: after the crash the newest
// valid checkpoint is the old one or the complete new one — never torn, never lost once
// WriteCheckpoint returned OK.
TEST(CheckpointTest, CrashAtEveryPointLeavesOldOrNew) {
  int points = 0;
  {
    auto mem = NewMemEnv();
    FaultInjectionEnv env(mem.get());
    ASSERT_TRUE(WriteCheckpoint(&env, "/c", MakeState(1, 1)).ok());
    int before = env.mutation_count();
    ASSERT_TRUE(WriteCheckpoint(&env, "/c", MakeState(2, 2), 300).ok());
    points = env.mutation_count() - before;
  }
  ASSERT_GT(points, 8);
  for (int n = 1; n <= points + 1; ++n) {
    auto mem = NewMemEnv();
    FaultInjectionEnv env(mem.get());
    ASSERT_TRUE(WriteCheckpoint(&env, "/c", MakeState(1, 1)).ok());
    env.FailNthMutation(n, /*sticky=*/true);
    absl::StatusOr<std::string> written = WriteCheckpoint(&env, "/c", MakeState(2, 2), 300);
    ASSERT_TRUE(env.SimulateCrash().ok());
    auto latest = LoadLatestCheckpoint(&env, "/c");
    ASSERT_TRUE(latest.ok()) << "n=" << n << ": " << latest.status();
    if (written.ok()) {
      EXPECT_EQ(latest->state.step, 2u) << "acknowledged checkpoint lost at n=" << n;
    }
    ExpectSame(MakeState(latest->state.step, latest->state.step == 1 ? 1 : 2), latest->state);
  }
}

TEST(CheckpointTest, PruneKeepsLastKAndRemovesLeftovers) {
  auto env = NewMemEnv();
  for (uint64_t step : {5, 10, 15, 20}) ASSERT_TRUE(WriteCheckpoint(env.get(), "/c", MakeState(step, step)).ok());
  ASSERT_TRUE(env->CreateDirs("/c/step-25.tmp").ok());
  ASSERT_TRUE(PruneCheckpoints(env.get(), "/c", 2).ok());
  auto names = env->ListDir("/c");
  EXPECT_EQ(*names, std::vector<std::string>({"step-15", "step-20"}));
}

TEST(CheckpointTest, AsyncWriterReportsCompletionAndPrunes) {
  auto env = NewMemEnv();
  std::vector<uint64_t> done;
  {
    CheckpointWriter writer(env.get(), "/c", 2, [&](uint64_t step, absl::StatusOr<std::string> dir) {
      ASSERT_TRUE(dir.ok()) << dir.status();
      done.push_back(step);
    });
    for (uint64_t step = 1; step <= 4; ++step) writer.Submit(MakeState(step, step));
    writer.Flush();
  }
  EXPECT_EQ(done, std::vector<uint64_t>({1, 2, 3, 4}));
  EXPECT_EQ(*env->ListDir("/c"), std::vector<std::string>({"step-3", "step-4"}));
}

// A failure at any point of a checkpoint's write and the pruning after it: the writer reports
// success exactly when the new checkpoint is durable (still the latest after a crash). A durable
// one whose pruning of older checkpoints failed is still reported (the coordinator must learn of
// it, or no restore would ever use it); one that is partial or not yet durable is an error.
TEST(CheckpointTest, WriterReportsSuccessExactlyWhenTheCheckpointIsDurable) {
  int pruning_failures = 0;
  bool covered = false;
  for (int n = 1; n <= 200 && !covered; ++n) {
    auto mem = NewMemEnv();
    FaultInjectionEnv env(mem.get());
    std::optional<absl::StatusOr<std::string>> second;
    {
      CheckpointWriter writer(&env, "/c", 1, [&](uint64_t step, absl::StatusOr<std::string> dir) {
        if (step == 2) second = std::move(dir);
      });
      writer.Submit(MakeState(1, 1));
      writer.Flush();
      env.FailNthMutation(n);
      writer.Submit(MakeState(2, 2));
      writer.Flush();
    }
    ASSERT_TRUE(second.has_value());
    const std::vector<std::string> names = *env.ListDir("/c");
    const bool old_kept = std::count(names.begin(), names.end(), "step-1") == 1;
    pruning_failures += second->ok() && old_kept;
    covered = second->ok() && !old_kept;  // n lies past the last mutation: every point was hit
    ASSERT_TRUE(env.SimulateCrash().ok());
    absl::StatusOr<LatestCheckpoint> latest = LoadLatestCheckpoint(&env, "/c");
    ASSERT_TRUE(latest.ok()) << "n " << n << ": " << latest.status();
    EXPECT_EQ(second->ok(), latest->state.step == 2)
        << "n " << n << ": the writer said " << second->status() << "; after a crash the latest is step "
        << latest->state.step;
    if (latest->state.step == 2) ExpectSame(MakeState(2, 2), latest->state);
  }
  EXPECT_TRUE(covered) << "200 injected failures did not get past the write and the pruning";
  EXPECT_GT(pruning_failures, 0) << "no failure hit the pruning: the test did not exercise it";
}

// What StreamCheckpoint delivered: each tensor's bytes as assembled by the sink, and how many
// times each byte arrived.
struct Assembled {
  std::vector<std::string> bytes;
  std::vector<std::vector<int>> hits;
  int calls = 0;
};

TensorChunkSink AssembleInto(const gyre::v1::CheckpointManifest& manifest, Assembled* out) {
  out->bytes.assign(manifest.tensors_size(), std::string());
  out->hits.assign(manifest.tensors_size(), std::vector<int>());
  for (int t = 0; t < manifest.tensors_size(); ++t) {
    out->bytes[t].assign(manifest.tensors(t).bytes(), '\0');
    out->hits[t].assign(manifest.tensors(t).bytes(), 0);
  }
  return [out](int t, uint64_t offset, std::string_view bytes) -> absl::Status {
    ++out->calls;
    if (offset + bytes.size() > out->bytes[t].size()) return absl::InternalError("slice outside its tensor");
    std::copy(bytes.begin(), bytes.end(), out->bytes[t].begin() + static_cast<std::ptrdiff_t>(offset));
    for (size_t i = 0; i < bytes.size(); ++i) ++out->hits[t][offset + i];
    return absl::OkStatus();
  };
}

// Several files, chunks smaller than a tensor and not aligned to any (a chunk ends inside a
// tensor, another holds the end of one tensor and the start of the next), 1-4 reader threads:
// every byte arrives exactly once and equals what was written.
TEST(CheckpointStreamTest, DeliversEveryTensorByteOnceAcrossFilesChunksAndThreads) {
  auto env = NewMemEnv();
  CheckpointState s = MakeState(7, 3);
  // 204 + 272 bytes in state-0.bin, 340 in state-1.bin.
  ASSERT_TRUE(WriteCheckpoint(env.get(), "/c", s, /*max_file_bytes=*/600).ok());
  auto manifest = ReadCheckpointManifest(env.get(), "/c/step-7");
  ASSERT_TRUE(manifest.ok()) << manifest.status();
  ASSERT_EQ(manifest->files_size(), 2);
  for (int threads : {1, 2, 4}) {
    for (size_t chunk : {size_t{13}, size_t{100}, size_t{1} << 20}) {
      Assembled got;
      CheckpointStreamOptions options;
      options.chunk_bytes = chunk;
      options.reader_threads = threads;
      int allocations = 0;
      options.allocate = [&](size_t bytes) {
        ++allocations;
        return std::shared_ptr<void>(std::malloc(bytes), std::free);
      };
      auto stats = StreamCheckpoint(env.get(), Clock::Real(), "/c/step-7", *manifest, options, AssembleInto(*manifest, &got));
      ASSERT_TRUE(stats.ok()) << stats.status();
      EXPECT_EQ(allocations, std::min(threads, manifest->files_size()) * options.buffers_per_reader);
      uint64_t total = 0;
      for (size_t t = 0; t < s.tensors.size(); ++t) {
        EXPECT_EQ(got.bytes[t], s.tensors[t].data()) << "tensor " << t << " threads " << threads << " chunk " << chunk;
        EXPECT_EQ(std::count(got.hits[t].begin(), got.hits[t].end(), 1), static_cast<long>(got.hits[t].size()));
        total += s.tensors[t].data().size();
      }
      EXPECT_EQ(stats->bytes, total);
      EXPECT_EQ(stats->reader_threads, std::min(threads, manifest->files_size()));
      EXPECT_EQ(stats->buffers, allocations);
      EXPECT_EQ(stats->chunk_bytes, chunk);
      if (chunk == 13) {
        EXPECT_GT(got.calls, static_cast<int>(s.tensors.size()));  // split tensors
      }
    }
  }
}

// A flipped byte in the LAST file is found only after the earlier files were delivered: the
// error names that file, and the caller is told (DataLoss) that the destination is a mix.
TEST(CheckpointStreamTest, FlippedByteInTheLastFileFailsNamingItAfterEarlierFilesArrived) {
  auto mem = NewMemEnv();
  FaultInjectionEnv env(mem.get());
  CheckpointState s = MakeState(7, 3);
  ASSERT_TRUE(WriteCheckpoint(&env, "/c", s, /*max_file_bytes=*/300).ok());
  auto manifest = ReadCheckpointManifest(&env, "/c/step-7");
  ASSERT_TRUE(manifest.ok());
  const std::string last = manifest->files(manifest->files_size() - 1).path();
  ASSERT_TRUE(env.FlipByte("/c/step-7/" + last, manifest->files(manifest->files_size() - 1).bytes() - 1).ok());
  Assembled got;
  CheckpointStreamOptions options;
  options.reader_threads = 1;  // files in order: the earlier ones are delivered first
  options.chunk_bytes = 64;
  auto stats = StreamCheckpoint(&env, Clock::Real(), "/c/step-7", *manifest, options, AssembleInto(*manifest, &got));
  ASSERT_TRUE(absl::IsDataLoss(stats.status())) << stats.status();
  EXPECT_NE(stats.status().message().find(last), std::string_view::npos) << stats.status();
  EXPECT_NE(stats.status().message().find("checksum"), std::string_view::npos) << stats.status();
  EXPECT_EQ(got.bytes[0], s.tensors[0].data());  // the first file's tensor arrived before the failure
}

// A file that is short or missing is found before any byte is delivered; so is a read error in
// the manifest. A read error in the middle of a file stops the stream naming the file.
TEST(CheckpointStreamTest, ShortOrMissingFilesFailBeforeAnyByteIsDelivered) {
  for (const std::string fault : {"short", "missing", "long"}) {
    auto mem = NewMemEnv();
    FaultInjectionEnv env(mem.get());
    ASSERT_TRUE(WriteCheckpoint(&env, "/c", MakeState(7, 3), /*max_file_bytes=*/300).ok());
    auto manifest = ReadCheckpointManifest(&env, "/c/step-7");
    ASSERT_TRUE(manifest.ok());
    const std::string last = "/c/step-7/" + manifest->files(manifest->files_size() - 1).path();
    std::string content = *mem->ReadFile(last);
    if (fault == "missing") {
      ASSERT_TRUE(env.RemoveFile(last).ok());
    } else {
      content = fault == "short" ? content.substr(0, content.size() - 1) : content + "x";
      ASSERT_TRUE(WriteFileAtomically(&env, last, content).ok());
    }
    Assembled got;
    auto stats = StreamCheckpoint(&env, Clock::Real(), "/c/step-7", *manifest, CheckpointStreamOptions(),
                                  AssembleInto(*manifest, &got));
    ASSERT_TRUE(absl::IsDataLoss(stats.status())) << fault << ": " << stats.status();
    EXPECT_NE(stats.status().message().find(last), std::string_view::npos) << stats.status();
    EXPECT_EQ(got.calls, 0) << fault;
  }
}

TEST(CheckpointStreamTest, AReadErrorOrASinkErrorStopsTheStream) {
  auto mem = NewMemEnv();
  FaultInjectionEnv env(mem.get());
  ASSERT_TRUE(WriteCheckpoint(&env, "/c", MakeState(7, 3), /*max_file_bytes=*/300).ok());
  auto manifest = ReadCheckpointManifest(&env, "/c/step-7");
  ASSERT_TRUE(manifest.ok());
  CheckpointStreamOptions options;
  options.reader_threads = 1;
  options.chunk_bytes = 64;
  env.FailNthRead(3);
  Assembled got;
  auto stats = StreamCheckpoint(&env, Clock::Real(), "/c/step-7", *manifest, options, AssembleInto(*manifest, &got));
  ASSERT_TRUE(absl::IsDataLoss(stats.status())) << stats.status();
  EXPECT_NE(stats.status().message().find("/c/step-7/state-0.bin"), std::string_view::npos) << stats.status();
  EXPECT_NE(stats.status().message().find("injected"), std::string_view::npos) << stats.status();

  int calls = 0;
  stats = StreamCheckpoint(&env, Clock::Real(), "/c/step-7", *manifest, options,
                           [&](int, uint64_t, std::string_view) {
                             return ++calls == 2 ? absl::InternalError("device copy failed") : absl::OkStatus();
                           });
  EXPECT_EQ(stats.status(), absl::InternalError("device copy failed"));
  EXPECT_EQ(calls, 2);
}

TEST(CheckpointStreamTest, ManifestChecks) {
  auto env = NewMemEnv();
  EXPECT_TRUE(absl::IsDataLoss(ReadCheckpointManifest(env.get(), "/c/step-1").status()));
  ASSERT_TRUE(WriteCheckpoint(env.get(), "/c", MakeState(1, 1)).ok());
  auto manifest = ReadCheckpointManifest(env.get(), "/c/step-1");
  ASSERT_TRUE(manifest.ok());
  EXPECT_EQ(manifest->step(), 1u);
  // A tensor that points past the end of its file.
  manifest->mutable_tensors(2)->set_offset(manifest->files(0).bytes());
  std::string bytes;
  ASSERT_TRUE(manifest->SerializeToString(&bytes));
  ASSERT_TRUE(WriteFileAtomically(env.get(), "/c/step-1/MANIFEST", bytes).ok());
  auto bad = ReadCheckpointManifest(env.get(), "/c/step-1");
  ASSERT_TRUE(absl::IsDataLoss(bad.status()));
  EXPECT_NE(bad.status().message().find("blocks.2.weight"), std::string_view::npos) << bad.status();
}

// StreamCheckpoint takes any manifest, not only ReadCheckpointManifest's: one that puts a tensor
// in an unlisted file, or past its file's end, is refused before the sink sees a byte (without the
// check the first would dereference a missing map entry, the second would be delivered short
// while the call returned OK).
TEST(CheckpointStreamTest, AnUncheckedManifestWithABadLayoutIsRefusedBeforeAnyByteIsDelivered) {
  auto env = NewMemEnv();
  ASSERT_TRUE(WriteCheckpoint(env.get(), "/c", MakeState(7, 3), /*max_file_bytes=*/300).ok());
  auto manifest = ReadCheckpointManifest(env.get(), "/c/step-7");
  ASSERT_TRUE(manifest.ok());
  for (const std::string fault : {"unlisted-file", "past-the-end", "listed-twice"}) {
    gyre::v1::CheckpointManifest bad = *manifest;
    std::string expect = "blocks.1.weight";
    if (fault == "unlisted-file") {
      bad.mutable_tensors(1)->set_file("state-9.bin");
    } else if (fault == "past-the-end") {
      bad.mutable_tensors(1)->set_bytes(bad.tensors(1).bytes() + 1 + bad.files(1).bytes());
    } else {
      *bad.add_files() = bad.files(0);
      expect = "lists " + bad.files(0).path() + " twice";
    }
    Assembled got;
    auto stats = StreamCheckpoint(env.get(), Clock::Real(), "/c/step-7", bad, CheckpointStreamOptions(),
                                  AssembleInto(bad, &got));
    ASSERT_TRUE(absl::IsDataLoss(stats.status())) << fault << ": " << stats.status();
    EXPECT_NE(stats.status().message().find(expect), std::string_view::npos) << fault << ": " << stats.status();
    EXPECT_EQ(got.calls, 0) << fault;
  }
}

// The run config's checkpoint.restore_* fields: unset keeps the given options, set ones replace
// them, out-of-range ones are refused naming the field.
TEST(CheckpointStreamTest, StreamOptionsFromTheRunConfig) {
  gyre::v1::CheckpointConfig config;
  CheckpointStreamOptions base;
  base.chunk_bytes = 4096;  // a test's small chunks survive an unset field
  base.reader_threads = 3;
  auto unset = StreamOptionsFromConfig(config, base);
  ASSERT_TRUE(unset.ok()) << unset.status();
  EXPECT_EQ(unset->chunk_bytes, 4096u);
  EXPECT_EQ(unset->reader_threads, 3);
  EXPECT_EQ(unset->buffers_per_reader, 2);
  auto defaults = StreamOptionsFromConfig(config);
  ASSERT_TRUE(defaults.ok());
  EXPECT_EQ(defaults->chunk_bytes, size_t{32} << 20);
  EXPECT_EQ(defaults->reader_threads, 4);
  EXPECT_EQ(defaults->buffers_per_reader, 2);

  config.set_restore_reader_threads(64);
  config.set_restore_chunk_bytes(uint64_t{1} << 20);
  config.set_restore_buffers_per_reader(16);
  auto set = StreamOptionsFromConfig(config, base);
  ASSERT_TRUE(set.ok()) << set.status();
  EXPECT_EQ(set->reader_threads, 64);
  EXPECT_EQ(set->chunk_bytes, size_t{1} << 20);
  EXPECT_EQ(set->buffers_per_reader, 16);

  struct Bad {
    std::function<void(gyre::v1::CheckpointConfig*)> set;
    std::string field;
  };
  const std::vector<Bad> bad = {
      {[](auto* c) { c->set_restore_reader_threads(65); }, "checkpoint.restore_reader_threads: 65"},
      {[](auto* c) { c->set_restore_chunk_bytes((uint64_t{1} << 20) - 1); }, "checkpoint.restore_chunk_bytes: 1048575"},
      {[](auto* c) { c->set_restore_chunk_bytes((uint64_t{1} << 30) + 1); }, "checkpoint.restore_chunk_bytes: 1073741825"},
      {[](auto* c) { c->set_restore_buffers_per_reader(17); }, "checkpoint.restore_buffers_per_reader: 17"},
      // 64 x 16 x 16 MiB = 16 GiB of buffers.
      {[](auto* c) {
         c->set_restore_reader_threads(64);
         c->set_restore_buffers_per_reader(16);
         c->set_restore_chunk_bytes(uint64_t{16} << 20);
       },
       "checkpoint.restore_reader_threads x checkpoint.restore_buffers_per_reader x checkpoint.restore_chunk_bytes"},
  };
  for (const Bad& b : bad) {
    gyre::v1::CheckpointConfig c;
    b.set(&c);
    auto refused = StreamOptionsFromConfig(c);
    ASSERT_TRUE(absl::IsInvalidArgument(refused.status())) << b.field << ": " << refused.status();
    EXPECT_EQ(refused.status().message().rfind(b.field, 0), 0u) << refused.status();
  }
}

}  // namespace
}  // namespace gyre
