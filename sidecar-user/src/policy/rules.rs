//! The policy as the data path uses it: ordered rules, first match wins, a default action
//! per direction. [`Policy::evaluate`] is a pure function of the policy and one connection.

use std::{fmt, net::SocketAddr};

use serde::Serialize;

use super::destinations::DestinationSettings;
use crate::{cidr::Cidr, telemetry::labels::Direction, tls::identity::SpiffeId};

/// What a matching rule (or a default) does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Allow,
    Deny,
    /// Let the connection through and log it at warn level.
    Audit,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
            Self::Audit => "audit",
        }
    }

    /// Whether the connection may proceed (audit does).
    pub fn lets_through(self) -> bool {
        self != Self::Deny
    }
}

/// A pattern on the verified SPIFFE ID of the sidecar at the other end of a tunnel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdPattern {
    /// `spiffe://td/ns/a/sa/b`: exactly this ID.
    Exact { trust_domain: String, path: String },
    /// `spiffe://td/ns/a/*`: every ID of trust domain `td` whose path starts with `/ns/a/`.
    Prefix { trust_domain: String, path: String },
    /// `spiffe://td`: every ID of the trust domain.
    TrustDomain(String),
}

impl IdPattern {
    pub fn matches(&self, id: &SpiffeId) -> bool {
        match self {
            Self::Exact { trust_domain, path } => {
                id.trust_domain() == trust_domain && id.path() == path
            }
            Self::Prefix { trust_domain, path } => {
                id.trust_domain() == trust_domain && id.path().starts_with(path.as_str())
            }
            Self::TrustDomain(td) => id.trust_domain() == td,
        }
    }

    /// Whether every ID this pattern matches is also matched by `outer`.
    pub fn within(&self, outer: &IdPattern) -> bool {
        let (td, path) = match self {
            Self::Exact { trust_domain, path } | Self::Prefix { trust_domain, path } => {
                (trust_domain.as_str(), path.as_str())
            }
            Self::TrustDomain(td) => (td.as_str(), ""),
        };
        match outer {
            Self::Exact { .. } => self == outer,
            Self::Prefix {
                trust_domain,
                path: p,
            } => {
                td == trust_domain
                    && !matches!(self, Self::TrustDomain(_))
                    && path.starts_with(p.as_str())
            }
            Self::TrustDomain(o) => td == o,
        }
    }
}

impl fmt::Display for IdPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exact { trust_domain, path } => write!(f, "spiffe://{trust_domain}{path}"),
            Self::Prefix { trust_domain, path } => write!(f, "spiffe://{trust_domain}{path}*"),
            Self::TrustDomain(td) => write!(f, "spiffe://{td}"),
        }
    }
}

/// An inclusive port range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub fn contains(&self, port: u16) -> bool {
        self.first <= port && port <= self.last
    }

    pub fn within(&self, outer: &PortRange) -> bool {
        outer.first <= self.first && self.last <= outer.last
    }
}

/// One rule. Empty match lists match everything.
#[derive(Debug, Clone)]
pub struct Rule {
    /// The rule's `name`, or `rule-<n>` (1-based position) when it has none.
    pub name: String,
    /// Line of the rule's `[[rule]]` header in the file (for messages).
    pub line: usize,
    pub action: Action,
    /// `None`: both directions.
    pub direction: Option<Direction>,
    /// The verified identity of the sidecar at the other end of the tunnel: the client's
    /// inbound (`sources` in the file), the server's outbound (`servers`). A rule with
    /// identities never matches a connection without one (plaintext).
    pub peers: Vec<IdPattern>,
    /// Outbound: the original destination; inbound: the local address the tunnel delivers
    /// to (the workload's own address, with the port the peer asked for).
    pub destinations: Vec<Cidr>,
    pub ports: Vec<PortRange>,
}

impl Rule {
    /// Whether this rule applies to `req` (first match wins, so order matters elsewhere).
    pub fn matches(&self, req: &Request<'_>) -> bool {
        self.matches_destination(req) && self.matches_peer(req)
    }

    /// Whether `req`'s direction and destination match, whoever the peer is.
    fn matches_destination(&self, req: &Request<'_>) -> bool {
        if self.direction.is_some_and(|d| d != req.direction) {
            return false;
        }
        if !self.ports.is_empty() && !self.ports.iter().any(|r| r.contains(req.dst.port())) {
            return false;
        }
        if !self.destinations.is_empty()
            && !self.destinations.iter().any(|c| c.contains(req.dst.ip()))
        {
            return false;
        }
        true
    }

    /// Whether `req`'s peer identity matches (a rule without identities matches any, and
    /// plaintext; one with identities never matches plaintext).
    fn matches_peer(&self, req: &Request<'_>) -> bool {
        if self.peers.is_empty() {
            return true;
        }
        req.peer
            .is_some_and(|id| self.peers.iter().any(|p| p.matches(id)))
    }

    /// Whether every connection `self` matches is also matched by `outer`.
    pub fn within(&self, outer: &Rule) -> bool {
        let direction = match (outer.direction, self.direction) {
            (None, _) => true,
            (Some(o), Some(s)) => o == s,
            (Some(_), None) => false,
        };
        let all = |outer_empty: bool, self_empty: bool, each: &dyn Fn() -> bool| {
            outer_empty || (!self_empty && each())
        };
        direction
            && all(outer.peers.is_empty(), self.peers.is_empty(), &|| {
                self.peers
                    .iter()
                    .all(|s| outer.peers.iter().any(|o| s.within(o)))
            })
            && all(
                outer.destinations.is_empty(),
                self.destinations.is_empty(),
                &|| {
                    self.destinations
                        .iter()
                        .all(|s| outer.destinations.iter().any(|o| cidr_within(s, o)))
                },
            )
            && all(outer.ports.is_empty(), self.ports.is_empty(), &|| {
                self.ports
                    .iter()
                    .all(|s| outer.ports.iter().any(|o| s.within(o)))
            })
    }
}

/// Whether CIDR `inner` lies inside `outer` (same family only).
pub fn cidr_within(inner: &Cidr, outer: &Cidr) -> bool {
    inner.addr.is_ipv4() == outer.addr.is_ipv4()
        && outer.prefix <= inner.prefix
        && outer.contains(inner.addr)
}

/// One connection to decide on.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub direction: Direction,
    /// The verified identity at the other end of the tunnel (inbound: the client's;
    /// outbound: the server's, known once the handshake is done); `None` in plaintext.
    pub peer: Option<&'a SpiffeId>,
    pub dst: SocketAddr,
}

/// The outcome of [`Policy::evaluate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Evaluation {
    /// The matching rule's action, or the direction's default.
    pub action: Action,
    /// Index of the matching rule; `None` for the default.
    pub rule: Option<usize>,
    /// Whether the connection is refused: a deny outside dry-run mode.
    pub refuse: bool,
}

/// A validated policy.
#[derive(Debug, Clone)]
pub struct Policy {
    pub rules: Vec<Rule>,
    pub default_outbound: Action,
    pub default_inbound: Action,
    /// Log (and count) what would be denied, refuse nothing (also not in the kernel).
    pub dry_run: bool,
    /// Resilience settings for named destinations (`[[destination]]`), first match wins.
    pub destinations: Vec<DestinationSettings>,
}

impl Default for Policy {
    /// Allows everything (what a sidecar without `--policy` does).
    fn default() -> Self {
        Self {
            rules: Vec::new(),
            default_outbound: Action::Allow,
            default_inbound: Action::Allow,
            dry_run: false,
            destinations: Vec::new(),
        }
    }
}

impl Policy {
    /// The `[[destination]]` settings that apply to `dst`, if any.
    pub fn destination(&self, dst: SocketAddr) -> Option<&DestinationSettings> {
        self.destinations.iter().find(|d| d.matches(dst))
    }

    pub fn default_for(&self, direction: Direction) -> Action {
        match direction {
            Direction::Outbound => self.default_outbound,
            Direction::Inbound => self.default_inbound,
        }
    }

    /// First matching rule wins; none matching → the direction's default.
    pub fn evaluate(&self, req: &Request<'_>) -> Evaluation {
        let (action, rule) = match self.rules.iter().position(|r| r.matches(req)) {
            Some(i) => (self.rules[i].action, Some(i)),
            None => (self.default_for(req.direction), None),
        };
        Evaluation {
            action,
            rule,
            refuse: action == Action::Deny && !self.dry_run,
        }
    }

    /// Whether the verdict on `req` depends on the peer's identity: the first rule that
    /// matches its direction and destination names identities. Outbound, the server's
    /// identity is only known after the handshake, so such a connection is decided then.
    pub fn depends_on_peer(&self, req: &Request<'_>) -> bool {
        self.rules
            .iter()
            .find(|r| r.matches_destination(req))
            .is_some_and(|r| !r.peers.is_empty())
    }

    /// The label counters and logs use for an evaluation's rule.
    pub fn rule_label(&self, evaluation: &Evaluation, direction: Direction) -> String {
        match evaluation.rule {
            Some(i) => self.rules[i].name.clone(),
            None => format!("default-{}", direction.as_str()),
        }
    }
}
