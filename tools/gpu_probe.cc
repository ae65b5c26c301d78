// gpu_probe: proves a Gyre binary runs on a GPU machine with everything it links: the CUDA
// runtime (a real kernel round trip checked against the host), NCCL (an all-reduce over every
// visible GPU, checked), gRPC (an echo round trip over loopback) and RocksDB (write,
// sync, reopen, read). Prints one line per check and exits non-zero on the first failure.
//
//   .bundle/bin/gpu_probe            (on the GPU machine; see tools/bundle.sh)
#include <cuda_runtime.h>
#include <nccl.h>
#include <unistd.h>

#include <condition_variable>
#include <cstdio>
#include <mutex>
#include <cstdlib>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "grpcpp/generic/generic_stub.h"
#include "grpcpp/grpcpp.h"
#include "grpcpp/generic/async_generic_service.h"
#include "kernels/cuda/device_info.h"
#include "rocksdb/db.h"

namespace {

int Fail(const std::string& what) {
  std::fprintf(stderr, "FAIL %s\n", what.c_str());
  return 1;
}

int ProbeCuda(int* device_count) {
  std::vector<gyre::cuda::DeviceInfo> devices;
  gyre::cuda::CudaResult r = gyre::cuda::ListDevices(&devices);
  if (!r.ok()) return Fail("cuda: " + r.message);
  if (devices.empty()) return Fail("cuda: no device visible");
  for (const auto& d : devices) {
    std::printf("ok   cuda device %d: %s, sm_%d%d, %d SMs, %.1f GiB, driver %d, runtime %d\n",
                d.ordinal, d.name.c_str(), d.sm_major, d.sm_minor, d.multiprocessors,
                d.global_memory_bytes / double(1 << 30), d.driver_version, d.runtime_version);
  }
  std::mt19937 rng(1234);
  std::normal_distribution<float> dist(0.f, 1.f);
  std::vector<float> values(1 << 22);
  for (float& v : values) v = dist(rng);
  gyre::cuda::BufferChecksum device_sum;
  r = gyre::cuda::ChecksumOnDevice(0, values, &device_sum);
  if (!r.ok()) return Fail("cuda kernel: " + r.message);
  gyre::cuda::BufferChecksum host_sum = gyre::cuda::ChecksumOnHost(values);
  if (device_sum.weighted_bits != host_sum.weighted_bits) return Fail("cuda kernel: checksum mismatch");
  std::printf("ok   cuda kernel checksum_kernel1 on %zu floats matches the host (sum %.6f)\n",
              values.size(), device_sum.sum);
  *device_count = static_cast<int>(devices.size());
  return 0;
}

int ProbeNccl(int device_count) {
  int version = 0;
  if (ncclGetVersion(&version) != ncclSuccess) return Fail("nccl: ncclGetVersion");
  std::vector<ncclComm_t> comms(device_count);
  std::vector<int> devs(device_count);
  for (int i = 0; i < device_count; ++i) devs[i] = i;
  ncclResult_t nr = ncclCommInitAll(comms.data(), device_count, devs.data());
  if (nr != ncclSuccess) return Fail(std::string("nccl: ncclCommInitAll: ") + ncclGetErrorString(nr));
  const size_t n = 1 << 20;
  std::vector<float*> buffers(device_count);
  std::vector<cudaStream_t> streams(device_count);
  for (int i = 0; i < device_count; ++i) {
    cudaSetDevice(i);
    cudaStreamCreate(&streams[i]);
    cudaMalloc(&buffers[i], n * sizeof(float));
    std::vector<float> host(n, float(i + 1));
    cudaMemcpy(buffers[i], host.data(), n * sizeof(float), cudaMemcpyHostToDevice);
  }
  ncclGroupStart();
  for (int i = 0; i < device_count; ++i) {
    ncclAllReduce(buffers[i], buffers[i], n, ncclFloat, ncclSum, comms[i], streams[i]);
  }
  nr = ncclGroupEnd();
  if (nr != ncclSuccess) return Fail(std::string("nccl: all-reduce: ") + ncclGetErrorString(nr));
  const float expected = device_count * (device_count + 1) / 2.0f;
  for (int i = 0; i < device_count; ++i) {
    cudaSetDevice(i);
    cudaStreamSynchronize(streams[i]);
    std::vector<float> host(n);
    cudaMemcpy(host.data(), buffers[i], n * sizeof(float), cudaMemcpyDeviceToHost);
    for (size_t j = 0; j < n; j += 4099) {
      if (host[j] != expected) return Fail("nccl: all-reduce gave a wrong sum");
    }
    cudaFree(buffers[i]);
    cudaStreamDestroy(streams[i]);
    ncclCommDestroy(comms[i]);
  }
  std::printf("ok   nccl %d: all-reduce of %zu floats over %d GPU(s) = %.0f everywhere\n", version, n,
              device_count, expected);
  return 0;
}

// Echoes every request's bytes back, for any method name: a real gRPC server path that needs
// no generated code (the health-check plugin is not registered in fully static links).
class EchoService final : public grpc::CallbackGenericService {
  grpc::ServerGenericBidiReactor* CreateReactor(grpc::GenericCallbackServerContext*) override {
    class Reactor final : public grpc::ServerGenericBidiReactor {
     public:
      Reactor() { StartRead(&buffer_); }
      void OnReadDone(bool ok) override {
        if (!ok) {
          Finish(grpc::Status::OK);
          return;
        }
        StartWrite(&buffer_);
      }
      void OnWriteDone(bool ok) override {
        if (!ok) {
          Finish(grpc::Status(grpc::StatusCode::INTERNAL, "write failed"));
          return;
        }
        StartRead(&buffer_);
      }
      void OnDone() override { delete this; }  // gRPC's reactor ownership contract

     private:
      grpc::ByteBuffer buffer_;
    };
    return new Reactor();
  }
};

int ProbeGrpc() {
  EchoService echo;
  int port = 0;
  grpc::ServerBuilder builder;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  builder.RegisterCallbackGenericService(&echo);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (!server || port == 0) return Fail("grpc: server did not start");
  auto channel = grpc::CreateChannel("127.0.0.1:" + std::to_string(port), grpc::InsecureChannelCredentials());
  grpc::GenericStub stub(channel);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  const std::string payload = "gyre probe payload \x01\x02";
  grpc::Slice slice(payload);
  grpc::ByteBuffer request(&slice, 1), response;
  grpc::Status status;
  bool done = false;
  std::mutex mu;
  std::condition_variable cv;
  stub.UnaryCall(&ctx, "/gyre.probe.Echo/Echo", grpc::StubOptions(), &request, &response,
                 [&](grpc::Status s) {
                   std::lock_guard<std::mutex> lock(mu);
                   status = s;
                   done = true;
                   cv.notify_one();
                 });
  {
    std::unique_lock<std::mutex> lock(mu);
    cv.wait(lock, [&] { return done; });
  }
  if (!status.ok()) return Fail("grpc: echo call: " + status.error_message());
  std::vector<grpc::Slice> slices;
  response.Dump(&slices);
  std::string bytes;
  for (const auto& s : slices) bytes.append(reinterpret_cast<const char*>(s.begin()), s.size());
  if (bytes != payload) return Fail("grpc: echo answered different bytes");
  server->Shutdown();
  std::printf("ok   grpc %s: echo round trip on 127.0.0.1:%d returned the payload\n", grpc::Version().c_str(), port);
  return 0;
}

int ProbeRocksdb() {
  char dir_template[] = "/tmp/gyre_probe_rocksdb_XXXXXX";
  if (mkdtemp(dir_template) == nullptr) return Fail("rocksdb: mkdtemp");
  std::string dir = std::string(dir_template) + "/db";
  rocksdb::Options options;
  options.create_if_missing = true;
  {
    rocksdb::DB* raw = nullptr;
    rocksdb::Status s = rocksdb::DB::Open(options, dir, &raw);
    if (!s.ok()) return Fail("rocksdb: open: " + s.ToString());
    std::unique_ptr<rocksdb::DB> db(raw);
    rocksdb::WriteOptions wo;
    wo.sync = true;
    s = db->Put(wo, "step/0000000000000001", "committed");
    if (!s.ok()) return Fail("rocksdb: put: " + s.ToString());
  }
  rocksdb::DB* raw = nullptr;
  rocksdb::Status s = rocksdb::DB::Open(options, dir, &raw);
  if (!s.ok()) return Fail("rocksdb: reopen: " + s.ToString());
  std::unique_ptr<rocksdb::DB> db(raw);
  std::string value;
  s = db->Get(rocksdb::ReadOptions(), "step/0000000000000001", &value);
  if (!s.ok() || value != "committed") return Fail("rocksdb: read back");
  db.reset();
  rocksdb::DestroyDB(dir, options);
  std::printf("ok   rocksdb %d.%d.%d: synced write survives reopen\n", ROCKSDB_MAJOR, ROCKSDB_MINOR, ROCKSDB_PATCH);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  // --host-only skips the GPU checks (to test the gRPC/RocksDB part of a bundle anywhere).
  const bool host_only = argc > 1 && std::string(argv[1]) == "--host-only";
  int failures = 0;
  int device_count = 0;
  if (!host_only) {
    failures += ProbeCuda(&device_count);
    if (device_count > 0) failures += ProbeNccl(device_count);
  }
  failures += ProbeGrpc();
  failures += ProbeRocksdb();
  if (failures > 0) {
    std::printf("gpu_probe: %d check(s) failed\n", failures);
    return 1;
  }
  std::printf("gpu_probe: all checks passed\n");
  return 0;
}
