//! Certificate rotation without restarts: the three files are re-read every `interval`; when
//! their content changes, the new set is validated as a whole and swapped in atomically. An
//! invalid or half-written set is refused with an error and the old one stays in force; it is
//! tried again as soon as the files change again.
//!
//! Content, not modification times, is compared, and each poll reads the three files as one
//! set ([`TlsFiles::read_set`](super::TlsFiles::read_set)), so kubelet's atomic Secret updates
//! (a `..data` symlink renamed onto a new directory) are picked up whole, never half-swapped.
//!
//! An outage (files deleted, or a bad set) is logged once at warn level, when it starts;
//! further refused changes during it are logged at debug level and counted; the first valid
//! set afterwards is logged as a recovery.

use std::{
    collections::hash_map::DefaultHasher,
    hash::{Hash, Hasher},
    sync::Arc,
    time::Duration,
};

use tracing::{debug, info, warn};

use super::{Credentials, FileSet, TlsError, TlsState};

/// The set as it is now, and its hash (an unreadable set hashes alike until it is readable).
fn poll(state: &TlsState) -> (u64, Option<FileSet>) {
    let set = state.files().read_set().ok();
    let mut h = DefaultHasher::new();
    set.hash(&mut h);
    (h.finish(), set)
}

/// What the watcher tells its caller (telemetry).
pub enum Rotation<'a> {
    /// A new valid set is in force.
    Loaded(&'a Credentials),
    /// The files changed but were refused; the current set stays.
    Refused(&'a TlsError),
}

/// Watches the files until the runtime shuts down; `on_change` hears of each new set and of
/// each refused change.
pub fn spawn_watcher(
    state: Arc<TlsState>,
    interval: Duration,
    on_change: impl Fn(Rotation<'_>) + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut seen = poll(&state).0;
        let mut refusing = false;
        loop {
            tokio::time::sleep(interval).await;
            let (now, set) = poll(&state);
            if now == seen {
                continue;
            }
            seen = now;
            let loaded = match &set {
                Some(set) => Credentials::from_set(state.files(), set),
                // Read again for the error that names the missing file.
                None => Credentials::load(state.files()),
            };
            match loaded {
                Ok(creds) => {
                    if refusing {
                        info!(identity = %creds.identity, "certificates valid again: rotated to them");
                    } else {
                        info!(identity = %creds.identity, "rotated to new certificates");
                    }
                    refusing = false;
                    on_change(Rotation::Loaded(&creds));
                    state.replace(creds);
                }
                Err(e) => {
                    if refusing {
                        debug!("new certificates refused again, keeping the current ones: {e}");
                    } else {
                        warn!("new certificates refused, keeping the current ones: {e}");
                    }
                    refusing = true;
                    on_change(Rotation::Refused(&e));
                }
            }
        }
    })
}
