//! The policy file: TOML, parsed strictly (unknown fields are errors) and validated whole.
//! Every error names the line and the problem, in one line, so a reload that is refused
//! says exactly what to fix.
//!
//! ```toml
//! dry_run = false                 # optional: log what would be denied, refuse nothing
//!
//! [defaults]                      # optional; both default to "allow"
//! outbound = "allow"
//! inbound = "deny"
//!
//! [[rule]]
//! name = "no-metadata"            # optional; counters and logs use it (else rule-<n>)
//! action = "deny"                 # allow | deny | audit
//! direction = "outbound"          # outbound | inbound; omitted: both
//! destinations = ["169.254.169.254/32", "fd00:ec2::254/128"]
//! ports = [80, "8000-8100"]       # single ports or "first-last"; omitted: all
//!
//! [[rule]]
//! action = "allow"
//! direction = "inbound"
//! sources = ["spiffe://example.org/ns/shop/*"]   # exact ID, path prefix /*, or spiffe://<td>
//! ports = [8080]
//!
//! [[rule]]
//! action = "allow"
//! direction = "outbound"
//! destinations = ["10.0.5.0/24"]
//! servers = ["spiffe://example.org/ns/db/sa/postgres"]  # the server sidecar's verified ID
//! ```

use serde::Deserialize;
use thiserror::Error;
use toml::Spanned;

use super::{
    destinations::{self, DestinationSettings},
    rules::{Action, IdPattern, Policy, PortRange, Rule},
};
use crate::{cidr::Cidr, telemetry::labels::Direction, tls::identity::SpiffeId};

/// A policy file that cannot be used, and where.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
#[error("line {line}: {message}")]
pub struct PolicyError {
    /// 1-based; 0 when the problem has no position (e.g. an empty file is fine, so rarely).
    pub line: usize,
    pub message: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDoc {
    #[serde(default)]
    dry_run: bool,
    #[serde(default)]
    defaults: Option<DefaultsDoc>,
    #[serde(default)]
    rule: Vec<Spanned<RuleDoc>>,
    #[serde(default)]
    destination: Vec<Spanned<DestinationDoc>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DestinationDoc {
    name: Option<Spanned<String>>,
    destinations: Spanned<Vec<Spanned<String>>>,
    ports: Option<Vec<Spanned<toml::Value>>>,
    connect_retries: Option<u32>,
    retry_backoff_ms: Option<u64>,
    circuit_failures: Option<u32>,
    circuit_open_ms: Option<u64>,
    circuit_open_max_ms: Option<u64>,
    max_connections: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DefaultsDoc {
    outbound: Option<Spanned<String>>,
    inbound: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleDoc {
    name: Option<Spanned<String>>,
    action: Spanned<String>,
    direction: Option<Spanned<String>>,
    sources: Option<Vec<Spanned<String>>>,
    servers: Option<Vec<Spanned<String>>>,
    destinations: Option<Vec<Spanned<String>>>,
    ports: Option<Vec<Spanned<toml::Value>>>,
}

/// An omitted list matches everything; an empty one would too, which is never what its
/// author meant (an emptied list usually means "nothing"), so it is an error.
fn non_empty<'a, T>(
    list: &'a Option<Vec<T>>,
    field: &str,
    at: usize,
    err: &dyn Fn(usize, String) -> PolicyError,
) -> Result<&'a [T], PolicyError> {
    match list {
        None => Ok(&[]),
        Some(v) if v.is_empty() => Err(err(
            at,
            format!("`{field} = []` is empty: omit the field to match any {field}"),
        )),
        Some(v) => Ok(v),
    }
}

/// The `name` of the `index`-th `[[kind]]` table, or `<kind>-<n>` without one; `taken` are
/// the names (and lines) of the tables before it: names must be unique and not blank.
fn table_name<'a>(
    name: &Option<Spanned<String>>,
    kind: &str,
    index: usize,
    mut taken: impl Iterator<Item = (&'a str, usize)>,
    err: &dyn Fn(usize, String) -> PolicyError,
) -> Result<String, PolicyError> {
    let Some(n) = name else {
        return Ok(format!("{kind}-{}", index + 1));
    };
    let at = n.span().start;
    if n.get_ref().trim().is_empty() {
        return Err(err(at, format!("a {kind} name may not be empty")));
    }
    if let Some((_, line)) = taken.find(|(other, _)| *other == n.get_ref()) {
        return Err(err(
            at,
            format!(
                "{kind} name {:?} is already used on line {line}: names must be unique",
                n.get_ref()
            ),
        ));
    }
    Ok(n.get_ref().clone())
}

/// Parses and validates a policy file's text.
pub fn parse(text: &str) -> Result<Policy, PolicyError> {
    let line_of = |offset: usize| line_at(text, offset);
    let doc: FileDoc = toml::from_str(text).map_err(|e| PolicyError {
        line: e.span().map(|s| line_of(s.start)).unwrap_or(0),
        message: e.message().trim().replace('\n', " "),
    })?;
    let err = |offset: usize, message: String| PolicyError {
        line: line_of(offset),
        message,
    };

    let default = |value: &Option<Spanned<String>>| -> Result<Action, PolicyError> {
        match value {
            None => Ok(Action::Allow),
            Some(v) => match parse_action(v.get_ref()) {
                Some(Action::Audit) => Err(err(
                    v.span().start,
                    "a default must be \"allow\" or \"deny\" (audit is for rules)".into(),
                )),
                Some(a) => Ok(a),
                None => Err(err(
                    v.span().start,
                    format!(
                        "{:?} is not an action: use \"allow\" or \"deny\"",
                        v.get_ref()
                    ),
                )),
            },
        }
    };
    let (default_outbound, default_inbound) = match &doc.defaults {
        Some(d) => (default(&d.outbound)?, default(&d.inbound)?),
        None => (Action::Allow, Action::Allow),
    };

    let mut rules: Vec<Rule> = Vec::with_capacity(doc.rule.len());
    for (index, spanned) in doc.rule.iter().enumerate() {
        let at = spanned.span().start;
        let r = spanned.get_ref();
        let taken = rules.iter().map(|o| (o.name.as_str(), o.line));
        let name = table_name(&r.name, "rule", index, taken, &err)?;
        let action = parse_action(r.action.get_ref()).ok_or_else(|| {
            err(
                r.action.span().start,
                format!(
                    "{:?} is not an action: use \"allow\", \"deny\" or \"audit\"",
                    r.action.get_ref()
                ),
            )
        })?;
        let direction = match &r.direction {
            None => None,
            Some(d) => Some(match d.get_ref().as_str() {
                "outbound" => Direction::Outbound,
                "inbound" => Direction::Inbound,
                other => {
                    return Err(err(
                        d.span().start,
                        format!("{other:?} is not a direction: use \"outbound\" or \"inbound\""),
                    ));
                }
            }),
        };
        let (sources, servers, destinations, ports) = (
            non_empty(&r.sources, "sources", at, &err)?,
            non_empty(&r.servers, "servers", at, &err)?,
            non_empty(&r.destinations, "destinations", at, &err)?,
            non_empty(&r.ports, "ports", at, &err)?,
        );
        if !sources.is_empty() && direction != Some(Direction::Inbound) {
            return Err(err(
                sources[0].span().start,
                "`sources` matches the verified identity of an inbound peer; outbound \
                 connections have none: add direction = \"inbound\""
                    .into(),
            ));
        }
        if !servers.is_empty() && direction != Some(Direction::Outbound) {
            return Err(err(
                servers[0].span().start,
                "`servers` matches the verified identity of the server an outbound tunnel \
                 reached; inbound connections have none: add direction = \"outbound\""
                    .into(),
            ));
        }
        // At most one of the two is set: each needs its own direction.
        let peers = sources
            .iter()
            .chain(servers)
            .map(|s| parse_pattern(s.get_ref()).map_err(|m| err(s.span().start, m)))
            .collect::<Result<Vec<_>, _>>()?;
        let destinations = destinations
            .iter()
            .map(|s| parse_cidr(s.get_ref()).map_err(|m| err(s.span().start, m)))
            .collect::<Result<Vec<_>, _>>()?;
        let ports = ports
            .iter()
            .map(|s| parse_ports(s.get_ref()).map_err(|m| err(s.span().start, m)))
            .collect::<Result<Vec<_>, _>>()?;
        let rule = Rule {
            name,
            line: line_of(at),
            action,
            direction,
            peers,
            destinations,
            ports,
        };
        // A rule that can never match because an earlier rule takes all its connections
        // with the opposite verdict is a contradiction: the author expected it to apply.
        if let Some(earlier) = rules
            .iter()
            .find(|e| rule.within(e) && e.action.lets_through() != rule.action.lets_through())
        {
            return Err(err(
                at,
                format!(
                    "rule {:?} can never match: rule {:?} (line {}) comes first, matches every \
                     connection it does and says {}: reorder or narrow them",
                    rule.name,
                    earlier.name,
                    earlier.line,
                    earlier.action.as_str()
                ),
            ));
        }
        rules.push(rule);
    }
    let mut destinations: Vec<DestinationSettings> = Vec::with_capacity(doc.destination.len());
    for (index, spanned) in doc.destination.iter().enumerate() {
        let at = spanned.span().start;
        let d = spanned.get_ref();
        let taken = destinations.iter().map(|o| (o.name.as_str(), o.line));
        let name = table_name(&d.name, "destination", index, taken, &err)?;
        if d.destinations.get_ref().is_empty() {
            return Err(err(
                d.destinations.span().start,
                "`destinations = []` is empty: name the CIDRs these settings are for".into(),
            ));
        }
        let cidrs = d
            .destinations
            .get_ref()
            .iter()
            .map(|s| parse_cidr(s.get_ref()).map_err(|m| err(s.span().start, m)))
            .collect::<Result<Vec<_>, _>>()?;
        let ports = non_empty(&d.ports, "ports", at, &err)?
            .iter()
            .map(|s| parse_ports(s.get_ref()).map_err(|m| err(s.span().start, m)))
            .collect::<Result<Vec<_>, _>>()?;
        let table = DestinationSettings {
            name,
            line: line_of(at),
            destinations: cidrs,
            ports,
            connect_retries: d.connect_retries,
            retry_backoff_ms: d.retry_backoff_ms,
            circuit_failures: d.circuit_failures,
            circuit_open_ms: d.circuit_open_ms,
            circuit_open_max_ms: d.circuit_open_max_ms,
            max_connections: d.max_connections,
        };
        if let Err((field, message)) = destinations::check(&table) {
            // The field's own line: the first one naming it after the table's header, before
            // the next header.
            let offset = text[at..]
                .lines()
                .scan(0, |pos, l| {
                    let start = *pos;
                    *pos += l.len() + 1;
                    Some((start, l.trim_start()))
                })
                .skip(1)
                .take_while(|(_, l)| !l.starts_with('['))
                .find(|(_, l)| l.starts_with(field))
                .map_or(at, |(start, _)| at + start);
            return Err(err(offset, message));
        }
        destinations.push(table);
    }
    Ok(Policy {
        rules,
        default_outbound,
        default_inbound,
        dry_run: doc.dry_run,
        destinations,
    })
}

/// 1-based line of a byte offset.
fn line_at(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

fn parse_action(s: &str) -> Option<Action> {
    match s {
        "allow" => Some(Action::Allow),
        "deny" => Some(Action::Deny),
        "audit" => Some(Action::Audit),
        _ => None,
    }
}

fn parse_cidr(s: &str) -> Result<Cidr, String> {
    // IPv4-mapped blocks are refused by `Cidr`'s parser.
    let cidr: Cidr = s.parse()?;
    let host_bits = (if cidr.addr.is_ipv4() { 32 } else { 128 }) - u32::from(cidr.prefix);
    let canonical = match cidr.addr {
        std::net::IpAddr::V4(a) => {
            u32::from(a) & u32::MAX.checked_shl(host_bits).unwrap_or(0) == u32::from(a)
        }
        std::net::IpAddr::V6(a) => {
            u128::from(a) & u128::MAX.checked_shl(host_bits).unwrap_or(0) == u128::from(a)
        }
    };
    if !canonical {
        return Err(format!(
            "{s:?} has bits set after the prefix length: did you mean a different prefix, or \
             the network address?"
        ));
    }
    Ok(cidr)
}

fn parse_ports(v: &toml::Value) -> Result<PortRange, String> {
    let port = |n: i64| {
        u16::try_from(n).map_err(|_| format!("port {n} is out of range: ports are 0-65535"))
    };
    match v {
        toml::Value::Integer(n) => {
            let p = port(*n)?;
            Ok(PortRange { first: p, last: p })
        }
        toml::Value::String(s) => {
            let bad = || format!("{s:?} is not a port or range: write 443 or \"8000-8100\"");
            let (a, b) = s.split_once('-').unwrap_or((s, s));
            let first = port(a.trim().parse::<i64>().map_err(|_| bad())?)?;
            let last = port(b.trim().parse::<i64>().map_err(|_| bad())?)?;
            if first > last {
                return Err(format!(
                    "port range {s:?} is empty: the first port is above the last"
                ));
            }
            Ok(PortRange { first, last })
        }
        other => Err(format!(
            "a port must be a number or a \"first-last\" string, not {}",
            other.type_str()
        )),
    }
}

fn parse_pattern(s: &str) -> Result<IdPattern, String> {
    let rest = s
        .strip_prefix("spiffe://")
        .ok_or_else(|| format!("{s:?} is not an identity pattern: it must start with spiffe://"))?;
    // Validate the trust domain with the SPIFFE ID rules by giving it a trivial path.
    let td_of = |td: &str| -> Result<String, String> {
        format!("spiffe://{td}/x")
            .parse::<SpiffeId>()
            .map(|id| id.trust_domain().to_string())
            .map_err(|e| e.to_string())
    };
    if let Some(base) = s.strip_suffix("/*") {
        let base_rest = &base["spiffe://".len().min(base.len())..];
        return match base_rest.find('/') {
            None => Ok(IdPattern::TrustDomain(td_of(base_rest)?)),
            Some(_) => {
                let id: SpiffeId = base
                    .parse()
                    .map_err(|e: crate::tls::identity::IdentityError| format!("{s:?}: {e}"))?;
                Ok(IdPattern::Prefix {
                    trust_domain: id.trust_domain().to_string(),
                    path: format!("{}/", id.path()),
                })
            }
        };
    }
    if !rest.contains('/') {
        return Ok(IdPattern::TrustDomain(td_of(rest)?));
    }
    if s.contains('*') {
        return Err(format!(
            "{s:?}: a wildcard is only allowed as a whole last segment, e.g. spiffe://td/ns/a/*"
        ));
    }
    let id: SpiffeId = s
        .parse()
        .map_err(|e: crate::tls::identity::IdentityError| e.to_string())?;
    Ok(IdPattern::Exact {
        trust_domain: id.trust_domain().to_string(),
        path: id.path().to_string(),
    })
}
