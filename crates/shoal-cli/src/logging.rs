//! Logging: `tracing` with a filter that keeps driver noise out. `log` calls (shoal's and
//! its dependencies') reach it through the `tracing-log` bridge.
//!
//! Without `RUST_LOG`, shoal's crates log at info and everything else at warn (wgpu and
//! naga at error). A bare level (`RUST_LOG=debug`) applies to shoal's crates only; to see
//! a dependency's logs, name it (`RUST_LOG=info,wgpu_hal=debug`): any `RUST_LOG` with a
//! `=` is taken as it is.

use tracing_subscriber::EnvFilter;

/// shoal's crates, as log targets.
const SHOAL: &[&str] =
    &["shoal", "shoal_cli", "shoal_server", "shoal_actor", "shoal_host", "shoal_engine", "shoal_gpu", "shoal_cuda"];

/// The filter directives for `rust_log` (the variable's value, if set).
pub fn directives(rust_log: Option<&str>) -> String {
    let level = match rust_log.map(str::trim) {
        Some(v) if v.contains('=') => return v.to_string(),
        Some(v) if !v.is_empty() => v.to_ascii_lowercase(),
        _ => "info".to_string(),
    };
    let mut d = String::from("warn,wgpu_core=error,wgpu_hal=error,naga=error");
    for c in SHOAL {
        d.push_str(&format!(",{c}={level}"));
    }
    d
}

/// Installs the subscriber (stderr, colours when it is a terminal).
pub fn init() {
    let env = std::env::var("RUST_LOG").ok();
    let filter = EnvFilter::try_new(directives(env.as_deref())).unwrap_or_else(|e| {
        eprintln!("shoal: RUST_LOG: {e}; using the default filter");
        EnvFilter::new(directives(None))
    });
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_levels_are_shoals_only() {
        let d = directives(Some("debug"));
        assert!(d.starts_with("warn,"), "{d}");
        assert!(d.contains("shoal_server=debug") && d.contains("wgpu_hal=error"), "{d}");
        assert_eq!(directives(Some("info,wgpu_hal=debug")), "info,wgpu_hal=debug");
        assert!(directives(None).contains("shoal_actor=info"));
    }
}
