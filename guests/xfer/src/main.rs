//! Round trips "guest memory → device op → guest memory" through `shoal_v1.scal`,
//! timed from inside the guest: the cost a guest sees, host call included.
//!
//! Usage: xfer [--bytes N]... [--repeat R]
//! Prints one JSON object per size: median, min and max microseconds per round trip,
//! the path the host took, and a check that every element was scaled.

use std::time::Instant;

fn main() {
    let mut sizes: Vec<usize> = Vec::new();
    let mut repeat = 20usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--bytes" => sizes.push(args.next().and_then(|s| s.parse().ok()).unwrap_or_else(|| usage())),
            "--repeat" => repeat = args.next().and_then(|s| s.parse().ok()).unwrap_or_else(|| usage()),
            _ => usage(),
        }
    }
    if sizes.is_empty() {
        sizes = vec![4 << 10, 1 << 20, 16 << 20];
    }
    for bytes in sizes {
        let n = bytes / 4;
        let mut x: Vec<f32> = (0..n).map(|i| (i % 1000) as f32 + 1.0).collect();
        // Warm up (first touch of the pages by the device, kernel load).
        for _ in 0..3 {
            shoal_guest::scal(&mut x, 1.0).unwrap_or_else(|e| fail(&e.to_string()));
        }
        let mut times = Vec::with_capacity(repeat);
        let mut sign = 1.0f32;
        for _ in 0..repeat {
            let t = Instant::now();
            shoal_guest::scal(&mut x, -1.0).unwrap_or_else(|e| fail(&e.to_string()));
            times.push(t.elapsed().as_secs_f64() * 1e6);
            sign = -sign;
        }
        let ok = x.iter().enumerate().all(|(i, v)| *v == sign * ((i % 1000) as f32 + 1.0));
        times.sort_by(|a, b| a.total_cmp(b));
        let median = times[times.len() / 2];
        let path = match shoal_guest::last_op().map(|o| o.path) {
            Ok(shoal_guest::Path::InPlace) => "in_place",
            Ok(shoal_guest::Path::Copy) => "copy",
            Ok(shoal_guest::Path::Dma) => "dma",
            _ => "unknown",
        };
        println!(
            "{{\"bytes\":{bytes},\"median_us\":{median:.2},\"min_us\":{:.2},\"max_us\":{:.2},\"gbps\":{:.2},\"path\":\"{path}\",\"correct\":{ok}}}",
            times[0],
            times[times.len() - 1],
            2.0 * bytes as f64 / (median * 1e-6) / 1e9
        );
    }
}

fn usage() -> ! {
    eprintln!("usage: xfer [--bytes N]... [--repeat R]");
    std::process::exit(2);
}

fn fail(msg: &str) -> ! {
    eprintln!("xfer: {msg}");
    std::process::exit(1);
}
