//! Open circuits refused in the kernel: the connect hooks read `OPEN_CIRCUITS`, so while a
//! destination's circuit is open the app's own `connect()` fails at once with EPERM (a
//! cgroup connect hook can refuse only with EPERM), whether the connection would have gone
//! through the proxy or straight to the destination.

use std::{net::SocketAddr, path::Path, sync::Mutex};

use aya::maps::{HashMap, MapData};
use sidecar_common::{CircuitKey, OrigDst, maps};
use tracing::warn;

use super::ebpf::{EbpfError, open_pinned};

/// Where open circuits are refused besides the proxy: the connect hooks, so the app's own
/// `connect()` fails at once (and a pass-through connection, which the proxy never sees,
/// is refused too).
pub trait CircuitSink: Send + Sync {
    /// Refuse connects to `dst` from now on. `false`: the kernel could not take it.
    fn open(&self, dst: SocketAddr) -> bool;
    /// Let connects to `dst` through again.
    fn close(&self, dst: SocketAddr);
}

/// What became of a connect the proxy did not make: the kernel's report of a pass-through
/// connection, which feeds the same circuit as the proxy's own connects.
pub trait ConnectOutcomes: Send + Sync {
    fn connect_outcome(&self, dst: SocketAddr, connected: bool);
}

/// One workload's entries in the pinned `OPEN_CIRCUITS` map.
pub struct KernelCircuits {
    map: Mutex<HashMap<MapData, CircuitKey, u8>>,
    scope: u32,
}

impl KernelCircuits {
    pub fn open(pin_dir: &Path, scope: u32) -> Result<Self, EbpfError> {
        Ok(Self {
            map: Mutex::new(open_pinned(pin_dir, maps::OPEN_CIRCUITS)?),
            scope,
        })
    }

    fn key(&self, dst: SocketAddr) -> CircuitKey {
        CircuitKey {
            dst: OrigDst::from_socket_addr(dst),
            scope: self.scope,
        }
    }
}

impl CircuitSink for KernelCircuits {
    fn open(&self, dst: SocketAddr) -> bool {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        match map.insert(self.key(dst), 1, 0) {
            Ok(()) => true,
            // Full: the proxy still fails these connections at once; only the kernel's
            // shortcut is missing.
            Err(e) => {
                warn!(%dst, "cannot refuse an open circuit in the kernel: {e}");
                false
            }
        }
    }

    fn close(&self, dst: SocketAddr) {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let _ = map.remove(&self.key(dst));
    }
}
