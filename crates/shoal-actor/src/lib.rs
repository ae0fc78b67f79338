//! shoal's actors: one Wasm instance plus a mailbox ([`Actor`]), and snapshots of their whole
//! state (linear memory, mutable globals, sessions and KV caches) as plain, versioned data
//! ([`Snapshot`], `docs/snapshot.md`), kept in a [`SnapshotStore`]. Every instance runs
//! under the [`shoal_host::Limits`] of its [`ActorConfig`]; [`Actor::kill`] stops one at once,
//! even inside a handler that never returns.
//!
//! ```no_run
//! use std::sync::Arc;
//! use shoal_actor::{Actor, ActorConfig, LocalStore, SnapshotStore};
//! use shoal_host::{InstanceOptions, Runtime};
//! # fn demo(runtime: Arc<Runtime>, wasm: &[u8]) -> Result<(), Box<dyn std::error::Error>> {
//! let module = runtime.prepare(wasm)?;
//! let actor = Actor::spawn(runtime.clone(), module.clone(), InstanceOptions::default(), ActorConfig::default())?;
//! println!("{}", String::from_utf8_lossy(&actor.ask("What is the capital of France?")?));
//! let store = LocalStore::new("snapshots");
//! store.put("alice", &actor.snapshot()?)?;
//! actor.stop();
//! let back = Actor::restore(runtime, module, store.get("alice")?, ActorConfig::default())?;
//! println!("{}", String::from_utf8_lossy(&back.ask("And of Germany?")?));
//! # Ok(()) }
//! ```

mod actor;
pub mod journal;
pub mod registry;
pub mod snapshot;
mod store;

pub use actor::{Actor, ActorConfig, ActorError, ActorStatus, ERROR_MARK, Event, MAILBOX, REPLY_QUEUE};
pub use journal::{Checkpointed, Journal, JournalError, Recovered};
pub use registry::{ActorInfo, Labels, MAX_NAME, Registry, RegistryError, Timing, check_name};
pub use snapshot::{
    LocalStore, MAX_KEY, ModelRef, Snapshot, SnapshotError, SnapshotStore, WriteReport, is_snapshot_dir, read_dir,
    write_dir,
};
