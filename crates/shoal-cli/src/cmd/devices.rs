//! `shoal devices [--json]`

/// Flags of `shoal devices`.
#[derive(clap::Args)]
pub struct Args {
    /// Print one JSON array instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> anyhow::Result<i32> {
    let probes = shoal_gpu::probe_all();
    if a.json {
        println!("{}", serde_json::to_string_pretty(&probes)?);
        return Ok(0);
    }
    for p in &probes {
        match &p.info {
            Some(info) => {
                let import = if info.imports_guest_memory { "guest memory in place" } else { "guest memory copied" };
                println!("{:<7} available  {}  ({import})", p.backend.name(), info.name);
                if let Some(note) = &info.import_note {
                    println!("        {note}");
                }
            }
            None => println!("{:<7} unavailable: {}", p.backend.name(), p.reason.as_deref().unwrap_or("unknown")),
        }
    }
    Ok(0)
}
