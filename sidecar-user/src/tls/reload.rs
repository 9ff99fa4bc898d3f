//! Certificate rotation without restarts: the three files are re-read every `interval`; when
//! their content changes, the new set is validated as a whole and swapped in atomically. An
//! invalid or half-written set is refused with an error and the old one stays in force; it is
//! tried again as soon as the files change again.
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

use super::{Credentials, TlsError, TlsState};

/// Hash of the three files' contents (missing files hash as empty).
fn fingerprint(state: &TlsState) -> u64 {
    let files = state.files();
    let mut h = DefaultHasher::new();
    for path in [&files.cert, &files.key, &files.bundle] {
        std::fs::read(path).unwrap_or_default().hash(&mut h);
    }
    h.finish()
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
        let mut seen = fingerprint(&state);
        let mut refusing = false;
        loop {
            tokio::time::sleep(interval).await;
            let now = fingerprint(&state);
            if now == seen {
                continue;
            }
            seen = now;
            match Credentials::load(state.files()) {
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
