// shoal's CUDA kernels, compiled at run time with NVRTC (no CUDA toolkit is needed
// to build shoal). They run on guest memory that is registered and mapped: the
// pointers are the guest's own addresses (unified addressing).

extern "C" __global__ void shoal_scal_f32(float* __restrict__ x, unsigned long long n, float alpha) {
    // Scalar head up to the first 512-byte boundary (a guest's arrays sit anywhere;
    // reads of mapped memory that straddle PCIe requests cost extra requests), then
    // 16-byte accesses with four loads in flight per thread (mapped memory is far
    // away: latency hides behind independent loads), then the scalar tail.
    unsigned long long tid = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
    unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    unsigned long long head = ((512ull - (((unsigned long long)x) & 511ull)) & 511ull) / 4ull;
    if (head > n) head = n;
    for (unsigned long long h = tid; h < head; h += stride) x[h] *= alpha;
    float4* x4 = reinterpret_cast<float4*>(x + head);
    unsigned long long n4 = (n - head) / 4ull;
    unsigned long long j = tid;
    for (; j + 3ull * stride < n4; j += 4ull * stride) {
        float4 a = x4[j], b = x4[j + stride], c = x4[j + 2ull * stride], d = x4[j + 3ull * stride];
        a.x *= alpha; a.y *= alpha; a.z *= alpha; a.w *= alpha;
        b.x *= alpha; b.y *= alpha; b.z *= alpha; b.w *= alpha;
        c.x *= alpha; c.y *= alpha; c.z *= alpha; c.w *= alpha;
        d.x *= alpha; d.y *= alpha; d.z *= alpha; d.w *= alpha;
        x4[j] = a; x4[j + stride] = b; x4[j + 2ull * stride] = c; x4[j + 3ull * stride] = d;
    }
    for (; j < n4; j += stride) {
        float4 v = x4[j];
        v.x *= alpha; v.y *= alpha; v.z *= alpha; v.w *= alpha;
        x4[j] = v;
    }
    unsigned long long t = head + n4 * 4ull + tid;
    if (t < n) x[t] *= alpha;
}
