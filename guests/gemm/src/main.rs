//! The reference check: fill A and B in our own memory, ask the host for C = A·B,
//! and check every element against our own product.
//!
//! Inputs are small integers, so every partial sum is exact in f32 whatever the
//! order of summation: the check is exact equality, element by element. C starts
//! as NaN, so an element the host did not write cannot pass.
//!
//! Usage: gemm [--size N]... [--async] [--json] [--bench R]
//!
//! With `--device`, A, B and C live in device buffers (uploaded once, C read back
//! once at the end): what a guest does with data that must stay on the GPU.
//!
//! With `--bench R` it times R products per size after a warm-up and prints the
//! median (and checks the last result only for sizes up to 2048: our own product in
//! wasm would take minutes beyond).

use std::time::Instant;

use shoal_guest::{DeviceBuffer, Dst, Gemm, Path, Src};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn small(&mut self) -> f32 {
        (self.next() >> 32) as i64 as f32 % 5.0
    }
}

/// Our own product, C = A·B, row-major, i-k-j order (vectorises in wasm).
fn reference(a: &[f32], b: &[f32], n: usize) -> Vec<f32> {
    let mut c = vec![0.0f32; n * n];
    for i in 0..n {
        let row = &mut c[i * n..(i + 1) * n];
        for p in 0..n {
            let av = a[i * n + p];
            let brow = &b[p * n..(p + 1) * n];
            for (cv, bv) in row.iter_mut().zip(brow) {
                *cv += av * bv;
            }
        }
    }
    c
}

fn main() {
    let mut sizes = Vec::new();
    let (mut json, mut asynchronous) = (false, false);
    let mut bench = 0usize;
    let mut device = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--size" => match args.next().and_then(|s| s.parse::<u32>().ok()) {
                Some(n) if n > 0 => sizes.push(n),
                _ => {
                    eprintln!("gemm: --size needs a positive integer");
                    std::process::exit(2);
                }
            },
            "--json" => json = true,
            "--device" => device = true,
            "--bench" => match args.next().and_then(|s| s.parse::<usize>().ok()) {
                Some(r) if r > 0 => bench = r,
                _ => {
                    eprintln!("gemm: --bench needs a positive count");
                    std::process::exit(2);
                }
            },
            "--async" => asynchronous = true,
            "--help" | "-h" => {
                println!("usage: gemm [--size N]... [--async] [--json]");
                return;
            }
            other => {
                eprintln!("gemm: unknown argument `{other}`");
                std::process::exit(2);
            }
        }
    }
    if sizes.is_empty() {
        sizes.push(128);
    }
    let info = match shoal_guest::device_info() {
        Ok(i) => i,
        Err(e) => {
            eprintln!("gemm: device_info failed: {e}");
            std::process::exit(1);
        }
    };
    // Warm-up: the first operation pays the driver's one-time allocations (descriptor
    // pools, shader caches); the measured calls below show the per-call cost.
    {
        let (a, b, mut c) = ([1.0f32; 64], [1.0f32; 64], [0.0f32; 64]);
        if let Err(e) = Gemm::new(8, 8, 8).run(&a, &b, &mut c) {
            eprintln!("gemm: warm-up refused: {e}");
            std::process::exit(1);
        }
    }
    let mut all_ok = true;
    for &size in &sizes {
        let n = size as usize;
        let mut rng = Rng(0x5eed_0000 + size as u64);
        let a: Vec<f32> = (0..n * n).map(|_| rng.small()).collect();
        let b: Vec<f32> = (0..n * n).map(|_| rng.small()).collect();
        let mut c = vec![f32::NAN; n * n];
        let gemm = Gemm::new(size, size, size);
        let mut bufs = if device {
            let mk = |data: &[f32]| -> shoal_guest::Result<DeviceBuffer> {
                let mut buf = DeviceBuffer::new(data.len())?;
                buf.write(0, data)?;
                Ok(buf)
            };
            match (mk(&a), mk(&b), DeviceBuffer::new(n * n)) {
                (Ok(x), Ok(y), Ok(z)) => Some((x, y, z)),
                (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
                    eprintln!("gemm: cannot put the operands in device buffers: {e}");
                    std::process::exit(1);
                }
            }
        } else {
            None
        };
        let mut run = |c: &mut [f32]| match &mut bufs {
            Some((da, db, dc)) => gemm.run_on(Src::Device(da), Src::Device(db), Dst::Device(dc)),
            None => gemm.run(&a, &b, c),
        };
        if bench > 0 {
            let mut times = Vec::with_capacity(bench);
            for i in 0..bench + 2 {
                let t = Instant::now();
                if let Err(e) = run(&mut c) {
                    eprintln!("gemm: the host refused {size}×{size}: {e}");
                    std::process::exit(1);
                }
                if i >= 2 {
                    times.push(t.elapsed().as_secs_f64() * 1e3);
                }
            }
            times.sort_by(|x, y| x.total_cmp(y));
            let median = times[times.len() / 2];
            if let Some((_, _, dc)) = &bufs
                && let Err(e) = dc.read(0, &mut c)
            {
                eprintln!("gemm: reading C back: {e}");
                std::process::exit(1);
            }
            let correct = if n <= 2048 {
                let want = reference(&a, &b, n);
                c.iter().zip(&want).filter(|(x, y)| x == y).count().to_string()
            } else {
                "null".to_string()
            };
            let path = match shoal_guest::last_op().map(|o| o.path) {
                Ok(Path::InPlace) => "in_place",
                Ok(Path::Copy) => "copy",
                Ok(Path::Dma) => "dma",
                Ok(Path::Device) => "device",
                _ => "unknown",
            };
            println!(
                "{{\"size\":{size},\"bench\":{bench},\"median_ms\":{median:.4},\"min_ms\":{:.4},\"tflops\":{:.3},\"path\":\"{path}\",\"device_buffers\":{device},\"correct\":{correct}}}",
                times[0],
                2.0 * (n as f64).powi(3) / (median * 1e-3) / 1e12
            );
            continue;
        }
        // One call of the same shape first: drivers load kernels per shape lazily
        // (cuBLAS), which is a one-time cost, not the per-call cost measured below.
        if let Err(e) = run(&mut c) {
            eprintln!("gemm: the host refused {size}×{size}: {e}");
            std::process::exit(1);
        }
        c.fill(f32::NAN);
        let t0 = Instant::now();
        let result = match device {
            true => run(&mut c),
            false if asynchronous => gemm.submit(&a, &b, &mut c).and_then(|p| p.wait()),
            false => gemm.run(&a, &b, &mut c),
        };
        let host_ms = t0.elapsed().as_secs_f64() * 1e3;
        if let Some((_, _, dc)) = &bufs
            && let Err(e) = dc.read(0, &mut c)
        {
            eprintln!("gemm: reading C back: {e}");
            std::process::exit(1);
        }
        if let Err(e) = result {
            eprintln!("gemm: the host refused {size}×{size}: {e}");
            std::process::exit(1);
        }
        let op = shoal_guest::last_op().ok();
        let t1 = Instant::now();
        let want = reference(&a, &b, n);
        let check_ms = t1.elapsed().as_secs_f64() * 1e3;
        let correct = c.iter().zip(&want).filter(|(x, y)| x == y).count();
        let first_bad = c.iter().zip(&want).position(|(x, y)| x != y);
        all_ok &= correct == n * n;
        let path = match op.map(|o| o.path) {
            Some(Path::InPlace) => "in_place",
            Some(Path::Copy) => "copy",
            Some(Path::Dma) => "dma",
            Some(Path::Device) => "device",
            _ => "unknown",
        };
        let gflops = 2.0 * (n as f64).powi(3) / (host_ms * 1e-3) / 1e9;
        if json {
            println!(
                "{{\"size\":{size},\"elements\":{},\"correct\":{correct},\"path\":\"{path}\",\"dispatches\":{},\"bytes_copied\":{},\"rss_delta_bytes\":{},\"gemm_ms\":{host_ms:.3},\"gflops\":{gflops:.2},\"check_ms\":{check_ms:.1},\"async\":{asynchronous}}}",
                n * n,
                op.map_or(0, |o| o.dispatches),
                op.map_or(0, |o| o.bytes_copied),
                op.map_or(0, |o| o.rss_delta_bytes),
            );
        } else {
            println!(
                "gemm {size}×{size}×{size} on {:?} ({}): {correct}/{} correct, path {path}, {host_ms:.2} ms ({gflops:.1} GFLOP/s); checked in {check_ms:.0} ms",
                info.backend,
                info.name,
                n * n
            );
            if let Some(i) = first_bad {
                println!("  first wrong element: C[{}][{}] = {} (want {})", i / n, i % n, c[i], want[i]);
            }
        }
    }
    if !all_ok {
        std::process::exit(1);
    }
}
