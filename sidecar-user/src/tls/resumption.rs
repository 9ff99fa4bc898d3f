//! TLS 1.3 session resumption between sidecars. A new tunnel to a peer we talked to recently
//! presents a ticket from an earlier handshake instead of exchanging and verifying
//! certificates again, which is most of a handshake's cost. The ticket only stands in for
//! the certificates: each resumption still does a fresh (EC)DHE key exchange (rustls offers
//! and accepts only `psk_dhe_ke`), so forward secrecy holds, and no 0-RTT data is accepted
//! (rustls' default, kept), so nothing can be replayed.
//!
//! The server keeps no state per session: tickets are sealed with a key of its own (rustls'
//! `ring` [`Ticketer`]) rather than kept in a store. rustls' default store holds the 256 most
//! recent tickets, two per handshake: with a few busy peers, a quieter one's ticket is evicted
//! within a fraction of a second and it never resumes. A sealed ticket works whoever else is
//! connecting.
//!
//! Why a resumed tunnel is as safe as a full one:
//! - *Credentials.* Each [`Credentials`](super::Credentials) builds its own ticket key and
//!   session cache, and drops them with it. After a rotation (new certificate, key or trust
//!   bundle: any reload, see [`super::reload`]), the server cannot open tickets issued before
//!   it and the client holds none from before it, so the next tunnel is a full handshake
//!   checked against the new trust. (rustls itself also refuses to resume a client session
//!   under another verifier or client certificate.)
//! - *Identity.* A resumed connection carries the certificate chain of the full handshake that
//!   issued its ticket, verified then (chain, key usage, trust domain) by these credentials'
//!   verifiers; both proxies read the peer's identity from it with
//!   [`verified_peer`](super::verify::verified_peer) and apply the policy exactly as after a
//!   full handshake.
//! - *Expiry.* rustls does not look at certificate validity when resuming, and a session may
//!   outlive the peer's certificate. [`verified_peer`](super::verify::verified_peer) checks the
//!   validity period at every handshake and refuses a certificate that is not valid now. That
//!   refuses nothing a full handshake would accept: a peer that rotated to a new certificate
//!   has new credentials, so it resumes nothing from before.
//! - *Lifetime.* The ticket key is replaced every 6 hours and the one before it is dropped
//!   6 hours later ([`Ticketer::new`]); tickets announce a 6-hour lifetime, after which the
//!   client discards them. So a ticket is good for at most 12 hours, often far less (a
//!   rotation ends it sooner); this bounds how long a stolen ticket key matters. Certificate
//!   expiry is not left to this bound (SPIFFE certificates often live an hour): it is checked
//!   as above.

use std::sync::Arc;

use rustls::{
    ClientConfig, ServerConfig, client::Resumption, crypto::ring::Ticketer,
    server::NoServerSessionStorage,
};

use super::TlsError;

/// How many peers' tickets an outbound configuration remembers, most recent first. rustls
/// keeps up to 8 tickets per peer, each holding a copy of both ends' certificates (a few KB),
/// so this bounds the cache to a few MB.
pub const RESUMABLE_PEERS: usize = 256;

/// Inbound tunnels: tickets sealed with a key of this configuration's own, nothing stored.
pub fn enable_on_server(config: &mut ServerConfig) -> Result<(), TlsError> {
    config.ticketer = Ticketer::new().map_err(|e| TlsError::Config(e.to_string()))?;
    // With a ticketer, TLS 1.3 never uses the store; none, so there is one way to resume.
    config.session_storage = Arc::new(NoServerSessionStorage {});
    Ok(())
}

/// Outbound tunnels: a bounded cache of the tickets our peers sent.
pub fn enable_on_client(config: &mut ClientConfig) {
    config.resumption = Resumption::in_memory_sessions(RESUMABLE_PEERS);
}

#[cfg(test)]
mod tests {
    use std::{
        net::Ipv4Addr,
        sync::atomic::{AtomicU64, Ordering},
        time::Duration,
    };

    use rustls::{
        pki_types::{ServerName, UnixTime},
        time_provider::TimeProvider,
    };
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    use super::*;
    use crate::tls::{
        Credentials, TlsFiles, certs,
        identity::SpiffeId,
        verify::{PeerError, VerifiedPeer, verified_peer},
    };

    const HOUR: Duration = Duration::from_secs(3600);

    /// The wall clock, `ahead` seconds ahead: rustls' notion of now in both configurations.
    #[derive(Debug, Default)]
    struct Clock {
        ahead: AtomicU64,
    }

    impl Clock {
        fn now(&self) -> UnixTime {
            let secs = UnixTime::now().as_secs() + self.ahead.load(Ordering::Relaxed);
            UnixTime::since_unix_epoch(Duration::from_secs(secs))
        }
    }

    impl TimeProvider for Clock {
        fn current_time(&self) -> Option<UnixTime> {
            Some(self.now())
        }
    }

    /// One sidecar's credentials, as loaded from its files (a reload builds them again from
    /// the same files).
    struct Sidecar {
        files: (String, String, String),
    }

    impl Sidecar {
        fn new(ca: &certs::Minted, name: &str) -> Self {
            let id: SpiffeId = format!("spiffe://example.org/{name}").parse().unwrap();
            let w =
                certs::mint_workload(&ca.cert_pem, &ca.key_pem, &id, HOUR, Duration::ZERO).unwrap();
            Self {
                files: (w.cert_pem, w.key_pem, ca.cert_pem.clone()),
            }
        }

        fn load(&self, clock: &Arc<Clock>) -> Credentials {
            let names = TlsFiles {
                cert: "cert.pem".into(),
                key: "key.pem".into(),
                bundle: "bundle.pem".into(),
            };
            let (cert, key, bundle) = &self.files;
            let mut c =
                Credentials::from_pem(&names, cert.as_bytes(), key.as_bytes(), bundle.as_bytes())
                    .unwrap();
            Arc::get_mut(&mut c.server).unwrap().time_provider = clock.clone();
            Arc::get_mut(&mut c.client).unwrap().time_provider = clock.clone();
            c
        }
    }

    type Seen = Result<VerifiedPeer, PeerError>;

    /// One tunnel between `client` and `server`: what each end made of the other, as the
    /// proxies see it. A byte goes each way, as on a tunnel, so the client reads the tickets
    /// the server sends after the handshake.
    async fn tunnel(
        client: &Credentials,
        server: &Credentials,
        clock: &Arc<Clock>,
    ) -> (Seen, Seen) {
        let (c, s) = tokio::io::duplex(64 << 10);
        let acceptor = TlsAcceptor::from(server.server.clone());
        let server_clock = clock.clone();
        let serving = tokio::spawn(async move {
            let mut tls = acceptor.accept(s).await.unwrap();
            tls.write_all(b"s").await.unwrap();
            tls.flush().await.unwrap();
            tls.read_exact(&mut [0]).await.unwrap();
            verified_peer(tls.get_ref().1, server_clock.now())
        });
        let name = ServerName::IpAddress(std::net::IpAddr::from(Ipv4Addr::new(10, 0, 0, 2)).into());
        let mut tls = TlsConnector::from(client.client.clone())
            .connect(name, c)
            .await
            .unwrap();
        tls.read_exact(&mut [0]).await.unwrap();
        tls.write_all(b"c").await.unwrap();
        tls.flush().await.unwrap();
        let seen_by_client = verified_peer(tls.get_ref().1, clock.now());
        (seen_by_client, serving.await.unwrap())
    }

    /// (resumed, peer) as each end saw it, both ends having accepted the other.
    fn kinds(seen: (Seen, Seen)) -> [(bool, String); 2] {
        let ok = |s: Seen| {
            let p = s.expect("the peer is accepted");
            (p.resumed, p.id.to_string())
        };
        [ok(seen.0), ok(seen.1)]
    }

    fn expect(resumed: bool) -> [(bool, String); 2] {
        [
            (resumed, "spiffe://example.org/b".into()),
            (resumed, "spiffe://example.org/a".into()),
        ]
    }

    #[tokio::test]
    async fn tunnels_resume_until_either_end_reloads_its_credentials() {
        let ca = certs::mint_ca("example.org", HOUR).unwrap();
        let clock = Arc::new(Clock::default());
        let (a, b) = (Sidecar::new(&ca, "a"), Sidecar::new(&ca, "b"));
        let (client, server) = (a.load(&clock), b.load(&clock));
        assert_eq!(kinds(tunnel(&client, &server, &clock).await), expect(false));
        assert_eq!(kinds(tunnel(&client, &server, &clock).await), expect(true));

        // The same files loaded again, as a rotation does: nothing from before resumes.
        let server = b.load(&clock);
        assert_eq!(kinds(tunnel(&client, &server, &clock).await), expect(false));
        assert_eq!(kinds(tunnel(&client, &server, &clock).await), expect(true));
        let client = a.load(&clock);
        assert_eq!(kinds(tunnel(&client, &server, &clock).await), expect(false));
    }

    /// rustls resumes a session whose certificates have expired since; the proxies' check
    /// refuses it, at both ends.
    #[tokio::test]
    async fn a_resumed_session_is_refused_once_the_certificates_expired() {
        let ca = certs::mint_ca("example.org", 4 * HOUR).unwrap();
        let clock = Arc::new(Clock::default());
        let (a, b) = (Sidecar::new(&ca, "a"), Sidecar::new(&ca, "b"));
        let (client, server) = (a.load(&clock), b.load(&clock));
        assert_eq!(kinds(tunnel(&client, &server, &clock).await), expect(false));

        // Past the workload certificates' hour, within the tickets' lifetime.
        clock.ahead.store(HOUR.as_secs() + 60, Ordering::Relaxed);
        let (seen_by_client, seen_by_server) = tunnel(&client, &server, &clock).await;
        for seen in [seen_by_client, seen_by_server] {
            assert!(
                matches!(seen, Err(PeerError::NotValidNow { .. })),
                "an expired certificate is refused: {seen:?}"
            );
        }
    }
}
