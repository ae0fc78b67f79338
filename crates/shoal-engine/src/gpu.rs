//! What the GPUs this process uses hold now, for the daemon's `/metrics`: device memory in
//! use (all processes') and the KV budget shared by the models on each. Only devices already
//! open are asked; nothing is opened (a daemon on the CPU reports none).

/// One GPU's memory.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GpuMemory {
    /// The CUDA ordinal.
    pub ordinal: i32,
    /// Its name.
    pub name: String,
    /// Bytes in use on it (by every process).
    pub used: u64,
    /// Its bytes in all.
    pub total: u64,
    /// Of the KV budget shared by this process's models on it: bytes mapped to KV pools.
    pub kv_used: u64,
    /// The KV budget (0 before a model asked for it).
    pub kv_limit: u64,
}

/// Every GPU this process has open.
#[cfg(feature = "cuda")]
pub fn memory() -> Vec<GpuMemory> {
    shoal_cuda::Device::opened()
        .iter()
        .filter_map(|d| {
            let (free, total) = d.memory_info().ok()?;
            let kv = d.kv_budget_made();
            Some(GpuMemory {
                ordinal: d.ordinal(),
                name: d.attributes().name.clone(),
                used: total.saturating_sub(free) as u64,
                total: total as u64,
                kv_used: kv.map_or(0, |b| b.used() as u64),
                kv_limit: kv.map_or(0, |b| b.limit() as u64),
            })
        })
        .collect()
}

/// Every GPU this process has open: none without the CUDA backend.
#[cfg(not(feature = "cuda"))]
pub fn memory() -> Vec<GpuMemory> {
    Vec::new()
}
