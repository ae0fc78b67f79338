// x = alpha * x over n f32 elements starting at element `off` of the binding.
struct Params { n: u32, off: u32, alpha: f32, pad: u32 }

@group(0) @binding(0) var<storage, read_write> X: array<f32>;
@group(0) @binding(1) var<uniform> S: Params;

@compute @workgroup_size(256, 1, 1)
fn scal(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let stride = nw.x * 256u;
    for (var i = gid.x; i < S.n; i = i + stride) {
        X[S.off + i] = X[S.off + i] * S.alpha;
    }
}
