// shoal's CUDA kernels, compiled at run time with NVRTC (no CUDA toolkit is needed
// to build shoal). They run on guest memory that is registered and mapped: the
// pointers are the guest's own addresses (unified addressing).

extern "C" __global__ void shoal_scal_f32(float* __restrict__ x, unsigned long long n, float alpha) {
    // 16-byte accesses where the pointer allows it, then the tail.
    unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
    unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    if ((((unsigned long long)x) & 15ull) == 0ull) {
        float4* x4 = reinterpret_cast<float4*>(x);
        unsigned long long n4 = n / 4ull;
        for (unsigned long long j = i; j < n4; j += stride) {
            float4 v = x4[j];
            v.x *= alpha; v.y *= alpha; v.z *= alpha; v.w *= alpha;
            x4[j] = v;
        }
        for (unsigned long long j = n4 * 4ull + i; j < n; j += stride) x[j] *= alpha;
    } else {
        for (unsigned long long j = i; j < n; j += stride) x[j] *= alpha;
    }
}
