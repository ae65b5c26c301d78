#include "cli/train_flags.h"

#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

#include "cli/run_config.h"
#include "google/protobuf/text_format.h"
#include "gtest/gtest.h"

namespace gyre::cli {
namespace {

// Parses `args` through the real flag registration (as `gyre train` does) into the config
// messages.
TrainFlagConfig ParseFlags(std::vector<std::string> args) {
  CLI::App app{"test"};
  TrainFlags flags;
  AddTrainFlags(&app, &flags);
  args.insert(args.begin(), "gyre-train");
  std::vector<const char*> argv;
  for (const auto& a : args) argv.push_back(a.c_str());
  app.parse(static_cast<int>(argv.size()), argv.data());
  return TrainFlagsToConfig(flags);
}

// What the launch path says about a config file whose model / train sections are `model` and
// `train` (plus the fields a launch needs anyway).
absl::Status FileConfigStatus(const std::string& model, const std::string& train) {
  const char* tmp = std::getenv("TEST_TMPDIR");
  const std::string path = std::string(tmp ? tmp : "/tmp") + "/train_flags.textproto";
  std::ofstream(path) << "name: \"t\"\nmodel { " << model << " }\n"
                      << "data { index_dir: \"/data/index\" seq_len: 64 global_batch: 8 }\n"
                      << "optimizer { lr: 0.001 }\ntrain { max_steps: 10 " << train << " }\n";
  absl::StatusOr<gyre::v1::RunConfig> c = LoadRunConfig(path);
  if (!c.ok()) return c.status();
  ApplyDefaults(&*c);
  return ValidateRunConfig(*c);
}

TEST(TrainFlagsTest, DefaultsLeaveTheConfigDefaults) {
  const TrainFlagConfig c = ParseFlags({"--preset", "xlstm-tiny"});
  EXPECT_FALSE(c.train.deterministic());
  EXPECT_TRUE(c.model.xlstm().mlstm_recompute().empty());
  auto r = ResolveTrainConfig(c);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_FALSE(r->spec.deterministic);
  EXPECT_EQ(r->spec.mlstm_recompute, "none");
  EXPECT_FALSE(r->spec.recompute_blocks);
}

TEST(TrainFlagsTest, DeterministicReachesTrainConfigAndModelSpec) {
  const TrainFlagConfig c = ParseFlags({"--preset", "llama-tiny", "--deterministic"});
  EXPECT_TRUE(c.train.deterministic());
  auto r = ResolveTrainConfig(c);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_TRUE(r->spec.deterministic);
}

TEST(TrainFlagsTest, MlstmRecomputeIsTheConfigField) {
  for (const std::string mode : {"none", "states", "glue", "cell"}) {
    for (const std::string flag : {"--mlstm_recompute", "--mlstm-recompute"}) {
      const TrainFlagConfig c = ParseFlags({"--preset", "xlstm-tiny", flag, mode});
      // The same ModelConfig a config file with this value holds.
      gyre::v1::ModelConfig file;
      ASSERT_TRUE(google::protobuf::TextFormat::ParseFromString(
          "preset: \"xlstm-tiny\" mtp_heads: 1 xlstm { mlstm_recompute: \"" + mode + "\" }", &file));
      EXPECT_EQ(c.model.SerializeAsString(), file.SerializeAsString()) << c.model.ShortDebugString();
      auto r = ResolveTrainConfig(c);
      ASSERT_TRUE(r.ok()) << r.status();
      EXPECT_EQ(r->spec.mlstm_recompute, mode);
    }
  }
}

TEST(TrainFlagsTest, MlstmKeepLastIsTheConfigField) {
  for (const std::string flag : {"--mlstm_keep_last", "--mlstm-keep-last"}) {
    const TrainFlagConfig c =
        ParseFlags({"--preset", "xlstm-tiny", "--mlstm_recompute", "states", flag, "1"});
    gyre::v1::ModelConfig file;
    ASSERT_TRUE(google::protobuf::TextFormat::ParseFromString(
        "preset: \"xlstm-tiny\" mtp_heads: 1 xlstm { mlstm_recompute: \"states\" mlstm_recompute_keep_last: 1 }",
        &file));
    EXPECT_EQ(c.model.SerializeAsString(), file.SerializeAsString()) << c.model.ShortDebugString();
    auto r = ResolveTrainConfig(c);
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->spec.mlstm_recompute_keep_last, 1);
  }
  // Without a recomputation mode the config's validation names the field.
  auto r = ResolveTrainConfig(ParseFlags({"--preset", "xlstm-tiny", "--mlstm_keep_last", "1"}));
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("model.xlstm.mlstm_recompute_keep_last"), std::string_view::npos) << r.status();
}

TEST(TrainFlagsTest, BadMlstmRecomputeGivesTheConfigError) {
  auto r = ResolveTrainConfig(ParseFlags({"--preset", "xlstm-tiny", "--mlstm_recompute", "sometimes"}));
  ASSERT_FALSE(r.ok());
  EXPECT_TRUE(absl::IsInvalidArgument(r.status()));
  EXPECT_NE(r.status().message().find("model.xlstm.mlstm_recompute"), std::string_view::npos) << r.status();
  const absl::Status file = FileConfigStatus("preset: \"xlstm-tiny\" xlstm { mlstm_recompute: \"sometimes\" }", "");
  EXPECT_EQ(r.status().message(), file.message());
}

TEST(TrainFlagsTest, MlstmRecomputeWithRecomputeBlocksGivesTheConfigError) {
  auto r = ResolveTrainConfig(ParseFlags({"--preset", "xlstm-tiny", "--recompute", "--mlstm_recompute", "states"}));
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("model.xlstm.mlstm_recompute"), std::string_view::npos) << r.status();
  EXPECT_NE(r.status().message().find("model.recompute_blocks"), std::string_view::npos) << r.status();
  const absl::Status file =
      FileConfigStatus("preset: \"xlstm-tiny\" recompute_blocks: true xlstm { mlstm_recompute: \"states\" }", "");
  EXPECT_EQ(r.status().message(), file.message());
  // "none" is no clash.
  auto none = ResolveTrainConfig(ParseFlags({"--preset", "xlstm-tiny", "--recompute", "--mlstm_recompute", "none"}));
  ASSERT_TRUE(none.ok()) << none.status();
  EXPECT_TRUE(none->spec.recompute_blocks);
}

TEST(TrainFlagsTest, OptimizerFlagsAreResolvedByTheConfigPath) {
  auto r = ResolveTrainConfig(ParseFlags({"--lr", "0"}));
  ASSERT_FALSE(r.ok());
  const absl::Status file = FileConfigStatus("preset: \"llama-tiny\"", "");
  EXPECT_TRUE(file.ok()) << file;
  EXPECT_NE(r.status().message().find("optimizer.lr"), std::string_view::npos) << r.status();
}

}  // namespace
}  // namespace gyre::cli
