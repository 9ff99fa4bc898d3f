//! Certificate rotation without restarts: the three files are re-read every `interval`; when
//! their content changes, the new set is validated as a whole and swapped in atomically. An
//! invalid or half-written set is refused with an error and the old one stays in force; it is
//! tried again as soon as the files change again.

use std::{
    collections::hash_map::DefaultHasher,
    hash::{Hash, Hasher},
    sync::Arc,
    time::Duration,
};

use tracing::{info, warn};

use super::{Credentials, TlsState};

/// Hash of the three files' contents (missing files hash as empty).
fn fingerprint(state: &TlsState) -> u64 {
    let files = state.files();
    let mut h = DefaultHasher::new();
    for path in [&files.cert, &files.key, &files.bundle] {
        std::fs::read(path).unwrap_or_default().hash(&mut h);
    }
    h.finish()
}

/// Watches the files until the runtime shuts down; `on_rotate` hears of each new set.
pub fn spawn_watcher(
    state: Arc<TlsState>,
    interval: Duration,
    on_rotate: impl Fn(&Credentials) + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut seen = fingerprint(&state);
        loop {
            tokio::time::sleep(interval).await;
            let now = fingerprint(&state);
            if now == seen {
                continue;
            }
            seen = now;
            match Credentials::load(state.files()) {
                Ok(creds) => {
                    info!(identity = %creds.identity, "rotated to new certificates");
                    on_rotate(&creds);
                    state.replace(creds);
                }
                Err(e) => warn!("new certificates refused, keeping the current ones: {e}"),
            }
        }
    })
}
