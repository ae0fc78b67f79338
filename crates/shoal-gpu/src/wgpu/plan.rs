//! Splitting a GEMM into tiles whose operand windows each fit one binding.

use crate::{Gemm, extent};

/// One piece of a GEMM: rows `i0..i1`, columns `j0..j1`, inner indices `p0..p1`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tile {
    pub i0: usize,
    pub i1: usize,
    pub j0: usize,
    pub j1: usize,
    pub p0: usize,
    pub p1: usize,
}

/// A window of one stored matrix: first element and number of elements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub start: usize,
    pub len: usize,
}

impl Tile {
    /// Whether this tile is the first of its C block along k (it applies beta).
    pub fn first_k(&self) -> bool {
        self.p0 == 0
    }

    /// The windows of A, B and C this tile touches (element indices into each stored matrix).
    pub fn windows(&self, op: &Gemm) -> [Window; 3] {
        let (ni, nj, np) = (self.i1 - self.i0, self.j1 - self.j0, self.p1 - self.p0);
        let w = |start: usize, rows: usize, cols: usize, ld: usize| Window {
            start,
            len: extent(rows as u64, cols as u64, ld as u64).unwrap_or(u64::MAX) as usize,
        };
        let a = if op.trans_a {
            w(self.p0 * op.lda + self.i0, np, ni, op.lda)
        } else {
            w(self.i0 * op.lda + self.p0, ni, np, op.lda)
        };
        let b = if op.trans_b {
            w(self.j0 * op.ldb + self.p0, nj, np, op.ldb)
        } else {
            w(self.p0 * op.ldb + self.j0, np, nj, op.ldb)
        };
        let c = w(self.i0 * op.ldc + self.j0, ni, nj, op.ldc);
        [a, b, c]
    }
}

/// The most rows or columns one dispatch covers (65535 workgroups of 64).
pub const MAX_TILE_SIDE: usize = 65535 * 64;

/// Splits `op` into tiles whose every window has at most `max_elems` elements.
/// Tiles that share a C block come in increasing `p` order.
pub fn plan(op: &Gemm, max_elems: usize) -> Vec<Tile> {
    let k = if op.alpha == 0.0 { 0 } else { op.k };
    let mut out = Vec::new();
    split(op, max_elems.max(1), Tile { i0: 0, i1: op.m, j0: 0, j1: op.n, p0: 0, p1: k }, &mut out);
    out
}

fn split(op: &Gemm, max: usize, t: Tile, out: &mut Vec<Tile>) {
    let [a, b, c] = t.windows(op);
    let has_k = t.p1 > t.p0;
    // For each operand that does not fit: (rows dimension, cols dimension) to halve.
    #[derive(Clone, Copy)]
    enum Dim {
        I,
        J,
        P,
    }
    // A dispatch has at most 65535 workgroups of 64 rows or columns per dimension.
    let too_wide = |n: usize| n > MAX_TILE_SIDE;
    let choice = if too_wide(t.i1 - t.i0) {
        Some((Dim::I, Dim::I))
    } else if too_wide(t.j1 - t.j0) {
        Some((Dim::J, Dim::J))
    } else if c.len > max {
        Some((Dim::I, Dim::J))
    } else if has_k && a.len > max {
        Some(if op.trans_a { (Dim::P, Dim::I) } else { (Dim::I, Dim::P) })
    } else if has_k && b.len > max {
        Some(if op.trans_b { (Dim::J, Dim::P) } else { (Dim::P, Dim::J) })
    } else {
        None
    };
    let Some((rows, cols)) = choice else {
        out.push(t);
        return;
    };
    let len = |d: Dim| match d {
        Dim::I => t.i1 - t.i0,
        Dim::J => t.j1 - t.j0,
        Dim::P => t.p1 - t.p0,
    };
    let d = if len(rows) > 1 { rows } else { cols };
    let (mut lo, mut hi) = (t, t);
    match d {
        Dim::I => {
            let mid = t.i0 + (t.i1 - t.i0) / 2;
            lo.i1 = mid;
            hi.i0 = mid;
        }
        Dim::J => {
            let mid = t.j0 + (t.j1 - t.j0) / 2;
            lo.j1 = mid;
            hi.j0 = mid;
        }
        Dim::P => {
            let mid = t.p0 + (t.p1 - t.p0) / 2;
            lo.p1 = mid;
            hi.p0 = mid;
        }
    }
    split(op, max, lo, out);
    split(op, max, hi, out);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DType, GemmSpec};

    fn op(m: u64, n: u64, k: u64, ta: bool, tb: bool) -> Gemm {
        let (lda, ldb) = (if ta { m } else { k }, if tb { k } else { n });
        GemmSpec {
            dtype: DType::F32,
            trans_a: ta,
            trans_b: tb,
            m,
            n,
            k,
            lda,
            ldb,
            ldc: n,
            alpha: 1.0,
            beta: 0.5,
            a: (0, m * k * 4),
            b: (m * k * 4, k * n * 4),
            c: ((m * k + k * n) * 4, m * n * 4),
        }
        .check(1 << 30)
        .unwrap()
    }

    #[test]
    fn tiles_cover_every_product_term_once_and_fit() {
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            let g = op(37, 29, 41, ta, tb);
            let max = 200;
            let tiles = plan(&g, max);
            let mut seen = vec![0u32; 37 * 29 * 41];
            for t in &tiles {
                for w in t.windows(&g) {
                    assert!(w.len <= max, "{t:?} {w:?}");
                }
                for i in t.i0..t.i1 {
                    for j in t.j0..t.j1 {
                        for p in t.p0..t.p1 {
                            seen[(i * 29 + j) * 41 + p] += 1;
                        }
                    }
                }
            }
            assert!(seen.iter().all(|&s| s == 1));
        }
    }

    #[test]
    fn a_fitting_op_is_one_tile() {
        let g = op(64, 64, 64, false, false);
        assert_eq!(plan(&g, 1 << 20).len(), 1);
    }
}
