#include "cli/run_config.h"

#include <cstdlib>
#include <fstream>

#include "gtest/gtest.h"

namespace gyre::cli {
namespace {

std::string Write(const std::string& name, const std::string& content) {
  const char* tmp = std::getenv("TEST_TMPDIR");
  std::string path = std::string(tmp ? tmp : "/tmp") + "/" + name;
  std::ofstream(path) << content;
  return path;
}

constexpr char kValid[] = R"(
name: "demo"
model { preset: "llama-tiny" }
data { index_dir: "/data/index" seq_len: 64 global_batch: 8 }
optimizer { lr: 0.001 }
train { max_steps: 10 }
)";

TEST(RunConfigTest, TextAndJsonLoadAndValidate) {
  auto c = LoadRunConfig(Write("a.textproto", kValid));
  ASSERT_TRUE(c.ok()) << c.status();
  ApplyDefaults(&*c);
  EXPECT_TRUE(ValidateRunConfig(*c).ok()) << ValidateRunConfig(*c);
  EXPECT_EQ(c->cluster().heartbeat_timeout_ms(), 10000u);
  auto j = LoadRunConfig(Write("b.json", RunConfigToJson(*c)));
  ASSERT_TRUE(j.ok()) << j.status();
  EXPECT_EQ(j->SerializeAsString(), c->SerializeAsString());
}

TEST(RunConfigTest, ParseErrorsNameFileAndLine) {
  auto c = LoadRunConfig(Write("bad.textproto", "name: \"x\"\nmodel { presett: \"llama-tiny\" }\n"));
  ASSERT_FALSE(c.ok());
  EXPECT_NE(c.status().message().find("bad.textproto"), std::string_view::npos);
  EXPECT_NE(c.status().message().find("line 2"), std::string_view::npos) << c.status();
  EXPECT_TRUE(absl::IsNotFound(LoadRunConfig("/nonexistent.textproto").status()));
}

TEST(RunConfigTest, ValidationNamesTheField) {
  auto c = LoadRunConfig(Write("c.textproto", kValid));
  ASSERT_TRUE(c.ok());
  ApplyDefaults(&*c);
  auto broken = *c;
  broken.mutable_data()->set_global_batch(0);
  EXPECT_NE(ValidateRunConfig(broken).message().find("data.global_batch"), std::string_view::npos);
  broken = *c;
  broken.mutable_optimizer()->set_lr(0);
  EXPECT_NE(ValidateRunConfig(broken).message().find("optimizer.lr"), std::string_view::npos);
  broken = *c;
  broken.mutable_model()->set_preset("gpt-17");
  EXPECT_FALSE(ValidateRunConfig(broken).ok());
  broken = *c;
  broken.mutable_cluster()->set_min_workers(3);
  EXPECT_NE(ValidateRunConfig(broken).message().find("cluster.min_workers"), std::string_view::npos);
  broken = *c;
  broken.set_name("a/b");
  EXPECT_NE(ValidateRunConfig(broken).message().find("name"), std::string_view::npos);
  broken = *c;
  broken.mutable_checkpoint()->set_restore_reader_threads(65);
  EXPECT_NE(ValidateRunConfig(broken).message().find("checkpoint.restore_reader_threads"), std::string_view::npos)
      << ValidateRunConfig(broken);
  broken = *c;
  broken.mutable_checkpoint()->set_restore_chunk_bytes(1000);
  EXPECT_NE(ValidateRunConfig(broken).message().find("checkpoint.restore_chunk_bytes"), std::string_view::npos)
      << ValidateRunConfig(broken);
}

}  // namespace
}  // namespace gyre::cli
