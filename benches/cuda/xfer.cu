// Raw CUDA reference for shoal's transfer table (docs/benchmarks.md): the same
// x = alpha·x kernel on N bytes of "guest" memory, reached four ways:
//   naive   : copy out of the sandbox into a host buffer, pageable cudaMemcpy to the
//             device, kernel, pageable copy back, copy into the sandbox;
//   pinned  : the guest memory registered, async copies to device memory and back;
//   mapped  : the guest memory registered and mapped, the kernel works on it in place;
//   device  : the kernel on device memory only (launch + sync floor).
// Build: nvcc -O3 -arch=sm_90 -o xfer xfer.cu      Run: ./xfer [repeats]
#include <cuda_runtime.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <algorithm>
#include <vector>

#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { \
  fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e)); exit(1); } } while (0)

// The same kernel as shoal's, by construction: its source file, included.
#include "../../crates/shoal-gpu/src/cuda/kernels.cu"

static int sms;
static unsigned long long cap_blocks = 1;  // blocks per multiprocessor at most (shoal's choice)
static void launch(float* p, size_t n, cudaStream_t s) {
  unsigned long long blocks = (n + 4 * 256 - 1) / (4 * 256);
  if (blocks < 1) blocks = 1;
  if (blocks > (unsigned long long)sms * cap_blocks) blocks = sms * cap_blocks;
  shoal_scal_f32<<<(unsigned)blocks, 256, 0, s>>>(p, n, -1.0f);
  CK(cudaGetLastError());
}


static double now_us() {
  struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

template <class F> static double median_us(int reps, F f) {
  for (int i = 0; i < 3; i++) f();
  std::vector<double> t;
  for (int i = 0; i < reps; i++) { double a = now_us(); f(); t.push_back(now_us() - a); }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

// Sweep: mapped in-place time by launch size and by page size of the guest memory.
static void sweep(int reps) {
  cudaStream_t s; CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  size_t sizes[] = {1 << 20, 4 << 20, 16 << 20, 256 << 20};
  for (int huge = 0; huge < 2; huge++) {
    for (size_t bytes : sizes) {
      size_t n = bytes / 4;
      float* guest = (float*)mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      madvise(guest, bytes, huge ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
      for (size_t i = 0; i < n; i++) guest[i] = 1.0f;
      CK(cudaHostRegister(guest, bytes, cudaHostRegisterMapped | cudaHostRegisterPortable));
      printf("{\"sweep\":true,\"hugepages\":%d,\"bytes\":%zu", huge, bytes);
      for (unsigned long long cap : {1ull, 2ull, 4ull, 8ull, 16ull, 64ull, 100000ull}) {
        cap_blocks = cap;
        double t = median_us(bytes >= (64 << 20) ? 5 : reps, [&] { launch(guest, n, s); CK(cudaStreamSynchronize(s)); });
        printf(",\"cap%llu_us\":%.2f", cap, t);
      }
      printf("}\n");
      CK(cudaHostUnregister(guest));
      munmap(guest, bytes);
    }
  }
  cap_blocks = 1;
}

int main(int argc, char** argv) {
  int reps = argc > 1 ? atoi(argv[1]) : 20;
  CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  if (argc > 2 && strcmp(argv[2], "sweep") == 0) { sweep(reps); return 0; }
  cudaDeviceProp prop; CK(cudaGetDeviceProperties(&prop, 0));
  cudaStream_t s; CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  printf("{\"device\":\"%s\"}\n", prop.name);
  size_t sizes[] = {4096, 65536, 1 << 20, 4 << 20, 16 << 20, 64 << 20, 256 << 20};
  for (size_t bytes : sizes) {
    size_t n = bytes / 4;
    // "Guest" memory: page-aligned anonymous memory, like a Wasm linear memory.
    float* guest = (float*)mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    for (size_t i = 0; i < n; i++) guest[i] = (float)(i % 1000) + 1.0f;
    float* outside = (float*)malloc(bytes);
    memset(outside, 0, bytes);
    float* dev; CK(cudaMalloc(&dev, bytes));
    int reps_here = bytes >= (64 << 20) ? std::max(5, reps / 4) : reps;

    double naive = median_us(reps_here, [&] {
      memcpy(outside, guest, bytes);
      CK(cudaMemcpy(dev, outside, bytes, cudaMemcpyHostToDevice));
      launch(dev, n, 0);
      CK(cudaMemcpy(outside, dev, bytes, cudaMemcpyDeviceToHost));
      memcpy(guest, outside, bytes);
    });
    double device = median_us(reps_here, [&] { launch(dev, n, s); CK(cudaStreamSynchronize(s)); });
    double t0 = now_us();
    CK(cudaHostRegister(guest, bytes, cudaHostRegisterMapped | cudaHostRegisterPortable));
    double reg_us = now_us() - t0;
    float* mapped; CK(cudaHostGetDevicePointer((void**)&mapped, guest, 0));
    double pinned = median_us(reps_here, [&] {
      CK(cudaMemcpyAsync(dev, guest, bytes, cudaMemcpyHostToDevice, s));
      launch(dev, n, s);
      CK(cudaMemcpyAsync(guest, dev, bytes, cudaMemcpyDeviceToHost, s));
      CK(cudaStreamSynchronize(s));
    });
    double inplace = median_us(reps_here, [&] { launch(mapped, n, s); CK(cudaStreamSynchronize(s)); });
    // Each timed variant scaled by -1 an even or odd number of times; check magnitudes.
    bool ok = true;
    for (size_t i = 0; i < n; i += 997) ok &= fabsf(guest[i]) == (float)(i % 1000) + 1.0f;
    CK(cudaHostUnregister(guest));
    printf("{\"bytes\":%zu,\"naive_us\":%.2f,\"pinned_async_us\":%.2f,\"mapped_inplace_us\":%.2f,\"device_floor_us\":%.2f,\"register_us\":%.1f,\"correct\":%s}\n",
           bytes, naive, pinned, inplace, device, reg_us, ok ? "true" : "false");
    CK(cudaFree(dev)); free(outside); munmap(guest, bytes);
  }
  return 0;
}
