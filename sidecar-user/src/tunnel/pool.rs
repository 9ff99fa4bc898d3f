//! The pool of HBONE connections, keyed by (our identity, peer tunnel address): a new
//! application connection opens a stream on a pooled connection that has room, and only when
//! none has is a new one dialled — one at a time per key, so a burst of connects to a new peer
//! makes one handshake, not one each.
//!
//! The pool's lock is held only to look connections up or add one, never across a dial: a
//! dial waits on its own key's gate, so a slow or dead peer holds up only the connects that
//! were going to it, never streams to other peers.
//!
//! The peer's identity is not part of the key because nothing tells us beforehand which one
//! to expect: every peer in our trust domain is accepted (see `tls::verify`), and the verified
//! identity travels with the connection. Our own identity is, as the generation of our
//! credentials: a rotation changes the key, so new streams go out on connections made with the
//! new certificate, and the old ones close once idle. (A peer that rotates sends GOAWAY on
//! the connections made with its old certificate, so the same holds the other way.)

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio_util::task::TaskTracker;

use super::{Settings, TunnelError, client::ClientConn, client::Reservation, dial, dial::Dialled};
use crate::tls::{TlsState, identity::SpiffeId};

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    /// Our credentials' generation: after a rotation, new streams go out on connections
    /// made with the new certificate.
    generation: u64,
    peer: SocketAddr,
}

/// A connection's place in the pool: what it was verified as when dialled.
struct Pooled {
    conn: Arc<ClientConn>,
    peer: SpiffeId,
}

#[derive(Default)]
struct Entry {
    conns: Vec<Pooled>,
    /// Held while a connection to this key is dialled.
    dialing: Arc<tokio::sync::Mutex<()>>,
}

/// What a new stream rides on.
pub struct Checkout {
    pub conn: Arc<ClientConn>,
    pub slot: Reservation,
    /// The peer's verified identity.
    pub peer: SpiffeId,
    /// How the connection came to be: `None` when it was already open (no handshake for
    /// this stream), else how long the dial and handshake took and whether TLS resumed.
    pub handshake: Option<(Duration, bool)>,
}

/// Streams and connections the pool has served, for `/metrics` and `/status`.
pub trait PoolEvents: Send + Sync {
    /// A connection was dialled (`true`) or has ended.
    fn connection(&self, opened: bool);
    /// A connection ended after carrying this many streams.
    fn carried(&self, streams: u64);
}

pub struct Pool {
    tls: Arc<TlsState>,
    settings: Settings,
    entries: Mutex<HashMap<Key, Entry>>,
    events: Arc<dyn PoolEvents>,
    /// The tasks driving the connections, so closing the pool can wait for them.
    drivers: TaskTracker,
}

/// One pooled connection as `/status` and `/connections` show it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PoolRow {
    /// The peer's tunnel address.
    pub peer: SocketAddr,
    /// Its verified identity.
    pub identity: String,
    /// Streams open on the connection now.
    pub streams: u32,
}

impl Pool {
    pub fn new(tls: Arc<TlsState>, settings: Settings, events: Arc<dyn PoolEvents>) -> Self {
        Self {
            tls,
            settings,
            entries: Mutex::new(HashMap::new()),
            events,
            drivers: TaskTracker::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A slot on a connection to the peer at `addr` (its tunnel port): on an open one that
    /// has room, else on one dialled now. `timeout` bounds the TCP connect and the handshakes.
    pub async fn checkout(
        self: &Arc<Self>,
        addr: SocketAddr,
        timeout: Duration,
    ) -> Result<Checkout, TunnelError> {
        let key = Key {
            generation: self.tls.generation(),
            peer: addr,
        };
        let gate = match self.reuse(&key) {
            Ok(checkout) => return Ok(checkout),
            Err(gate) => gate,
        };
        // One dial at a time per key; whoever waited may find the connection just made.
        let _dialing = gate.lock().await;
        let gate = match self.reuse(&key) {
            Ok(checkout) => return Ok(checkout),
            Err(gate) => gate,
        };
        let started = Instant::now();
        let Dialled {
            stream,
            peer,
            resumed,
        } = dial::dial(&self.tls, addr, timeout).await?;
        let weak = Arc::downgrade(self);
        let events = self.events.clone();
        let closed_key = key.clone();
        let on_close = move |carried| {
            events.carried(carried);
            events.connection(false);
            if let Some(pool) = weak.upgrade() {
                pool.forget(&closed_key);
            }
        };
        let handshake =
            ClientConn::handshake(stream, addr, &self.settings, &self.drivers, on_close);
        let conn = match tokio::time::timeout(timeout, handshake).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => {
                return Err(TunnelError::Http2 {
                    addr,
                    reason: e.to_string(),
                });
            }
            Err(_) => return Err(TunnelError::HandshakeTimeout { addr, timeout }),
        };
        self.events.connection(true);
        // A new connection has room for its first stream, unless it already ended (the peer
        // closed it right after the handshake).
        let Some(slot) = conn.try_reserve() else {
            return Err(TunnelError::Http2 {
                addr,
                reason: "the connection closed right after its handshake".into(),
            });
        };
        let mut entries = self.lock();
        let entry = entries.entry(key).or_default();
        entry.dialing = gate;
        entry.conns.push(Pooled {
            conn: conn.clone(),
            peer: peer.clone(),
        });
        Ok(Checkout {
            conn,
            slot,
            peer,
            handshake: Some((started.elapsed(), resumed)),
        })
    }

    /// A slot on an open connection of `key`, or the key's dial gate when none has room.
    fn reuse(&self, key: &Key) -> Result<Checkout, Arc<tokio::sync::Mutex<()>>> {
        let mut entries = self.lock();
        let entry = entries.entry(key.clone()).or_default();
        entry.conns.retain(|p| p.conn.usable());
        for pooled in &entry.conns {
            if let Some(slot) = pooled.conn.try_reserve() {
                return Ok(Checkout {
                    conn: pooled.conn.clone(),
                    slot,
                    peer: pooled.peer.clone(),
                    handshake: None,
                });
            }
        }
        Err(entry.dialing.clone())
    }

    /// Takes an ended connection out of the pool (and its key, once empty).
    fn forget(&self, key: &Key) {
        let mut entries = self.lock();
        if let Some(entry) = entries.get_mut(key) {
            entry.conns.retain(|p| p.conn.usable());
            if entry.conns.is_empty() && Arc::strong_count(&entry.dialing) == 1 {
                entries.remove(key);
            }
        }
    }

    /// The connections that take streams, by peer.
    pub fn rows(&self) -> Vec<PoolRow> {
        let entries = self.lock();
        let mut rows: Vec<PoolRow> = entries
            .iter()
            .flat_map(|(key, entry)| {
                entry
                    .conns
                    .iter()
                    .filter(|p| p.conn.usable())
                    .map(|p| PoolRow {
                        peer: key.peer,
                        identity: p.peer.to_string(),
                        streams: p.conn.open_streams(),
                    })
            })
            .collect();
        rows.sort_by_key(|r| r.peer);
        rows
    }

    /// Closes every connection (the sidecar is exiting) and waits until they have closed:
    /// each sends its streams' last frames, then GOAWAY and TLS close_notify, so no peer
    /// sees a stream cut that our side had finished. Open streams may still end meanwhile.
    pub async fn close(&self) {
        for entry in self.lock().values() {
            for p in &entry.conns {
                p.conn.shut_down();
            }
        }
        self.drivers.close();
        self.drivers.wait().await;
    }
}
