//! Table-driven tests of parsing, validation and evaluation.

use std::net::SocketAddr;

use super::{
    rules::{Action, Request},
    schema::parse,
};
use crate::{telemetry::labels::Direction, tls::identity::SpiffeId};

const POLICY: &str = r#"
[defaults]
outbound = "allow"
inbound = "deny"

[[rule]]
name = "metadata"
action = "deny"
direction = "outbound"
destinations = ["169.254.169.254/32", "fd00:ec2::254/128"]

[[rule]]
name = "db-range"
action = "deny"
direction = "outbound"
destinations = ["10.0.0.0/8"]
ports = ["5432-5440", 6379]

[[rule]]
name = "db-admin"
action = "allow"
direction = "outbound"
destinations = ["10.0.5.0/24"]
ports = [5432, 8080]

[[rule]]
name = "v6-audit"
action = "audit"
direction = "outbound"
destinations = ["2001:db8::/32"]
ports = ["0-1023"]

[[rule]]
name = "shop"
action = "allow"
direction = "inbound"
sources = ["spiffe://example.org/ns/shop/*"]
ports = [8080]

[[rule]]
name = "admin"
action = "allow"
direction = "inbound"
sources = ["spiffe://example.org/ns/ops/sa/admin"]

[[rule]]
name = "partner"
action = "audit"
direction = "inbound"
sources = ["spiffe://partner.example"]
"#;

/// A connection to decide on: direction, peer identity, destination.
type Conn = (Direction, Option<&'static str>, &'static str);

fn out(dst: &'static str) -> Conn {
    (Direction::Outbound, None, dst)
}

fn inb(id: &'static str, dst: &'static str) -> Conn {
    (Direction::Inbound, Some(id), dst)
}

#[test]
fn evaluation_table() {
    let policy = parse(POLICY).unwrap();
    let cases: &[(Conn, &str, Action)] = &[
        // Exact host, both families.
        (out("169.254.169.254:80"), "metadata", Action::Deny),
        (out("169.254.169.253:80"), "default-outbound", Action::Allow),
        (out("[fd00:ec2::254]:80"), "metadata", Action::Deny),
        (out("[fd00:ec2::255]:80"), "default-outbound", Action::Allow),
        // Port range edges.
        (out("10.1.2.3:5431"), "default-outbound", Action::Allow),
        (out("10.1.2.3:5432"), "db-range", Action::Deny),
        (out("10.1.2.3:5440"), "db-range", Action::Deny),
        (out("10.1.2.3:5441"), "default-outbound", Action::Allow),
        (out("10.1.2.3:6379"), "db-range", Action::Deny),
        // Overlap: the broader deny comes first, so the narrower allow never wins on 5432…
        (out("10.0.5.7:5432"), "db-range", Action::Deny),
        (out("10.0.5.7:8080"), "db-admin", Action::Allow),
        (out("11.0.5.7:5432"), "default-outbound", Action::Allow),
        // v4-mapped IPv6 is the IPv4 address.
        (out("[::ffff:10.1.2.3]:5432"), "db-range", Action::Deny),
        // IPv6 prefix and range.
        (out("[2001:db8:1::1]:443"), "v6-audit", Action::Audit),
        (
            out("[2001:db8:1::1]:1024"),
            "default-outbound",
            Action::Allow,
        ),
        (out("[2001:db9::1]:443"), "default-outbound", Action::Allow),
        // Inbound: prefix, exact, trust domain, and the deny default.
        (
            inb("spiffe://example.org/ns/shop/sa/web", "10.0.0.2:8080"),
            "shop",
            Action::Allow,
        ),
        (
            inb("spiffe://example.org/ns/shop/sa/web", "10.0.0.2:9090"),
            "default-inbound",
            Action::Deny,
        ),
        // Prefix is by whole segment: /ns/shopping is not /ns/shop/*.
        (
            inb("spiffe://example.org/ns/shopping/sa/web", "10.0.0.2:8080"),
            "default-inbound",
            Action::Deny,
        ),
        (
            inb("spiffe://example.org/ns/ops/sa/admin", "10.0.0.2:22"),
            "admin",
            Action::Allow,
        ),
        (
            inb("spiffe://example.org/ns/ops/sa/admin2", "10.0.0.2:22"),
            "default-inbound",
            Action::Deny,
        ),
        (
            inb("spiffe://partner.example/anything", "[fd00::2]:1"),
            "partner",
            Action::Audit,
        ),
        (
            inb("spiffe://other.example/ns/shop/sa/web", "10.0.0.2:8080"),
            "default-inbound",
            Action::Deny,
        ),
    ];
    for ((direction, id, dst), rule, action) in cases {
        let id: Option<SpiffeId> = id.map(|s| s.parse().unwrap());
        let dst: SocketAddr = dst.parse().unwrap();
        let d = policy.evaluate(&Request {
            direction: *direction,
            peer: id.as_ref(),
            dst,
        });
        assert_eq!(
            (policy.rule_label(&d, *direction).as_str(), d.action),
            (*rule, *action),
            "{direction:?} {id:?} {dst}"
        );
        assert_eq!(d.refuse, *action == Action::Deny);
    }
}

#[test]
fn outbound_rules_do_not_apply_inbound_and_vice_versa() {
    let policy = parse(
        r#"
        [[rule]]
        action = "deny"
        direction = "inbound"
        ports = [80]
        [[rule]]
        action = "deny"
        ports = [81]
        "#,
    )
    .unwrap();
    let id: SpiffeId = "spiffe://td/a".parse().unwrap();
    let check = |direction, port, refused| {
        let d = policy.evaluate(&Request {
            direction,
            peer: (direction == Direction::Inbound).then_some(&id),
            dst: SocketAddr::from(([10, 0, 0, 1], port)),
        });
        assert_eq!(d.refuse, refused, "{direction:?} {port}");
    };
    check(Direction::Outbound, 80, false);
    check(Direction::Inbound, 80, true);
    check(Direction::Outbound, 81, true);
    check(Direction::Inbound, 81, true);
}

#[test]
fn empty_policy_and_defaults() {
    let any = |text: &str, direction: Direction| {
        let id: SpiffeId = "spiffe://td/a".parse().unwrap();
        parse(text)
            .unwrap()
            .evaluate(&Request {
                direction,
                peer: Some(&id),
                dst: "[::1]:1".parse().unwrap(),
            })
            .refuse
    };
    assert!(!any("", Direction::Outbound) && !any("", Direction::Inbound));
    let deny_in = "[defaults]\ninbound = \"deny\"\n";
    assert!(!any(deny_in, Direction::Outbound) && any(deny_in, Direction::Inbound));
    let dry = "dry_run = true\n[defaults]\noutbound = \"deny\"\n";
    let p = parse(dry).unwrap();
    let d = p.evaluate(&Request {
        direction: Direction::Outbound,
        peer: None,
        dst: "[::1]:1".parse().unwrap(),
    });
    assert_eq!((d.action, d.refuse), (Action::Deny, false), "dry run");
}

/// Each bad file: the line the error names and a fragment of the problem.
#[test]
fn invalid_files_name_line_and_problem() {
    let cases: &[(&str, usize, &str)] = &[
        ("[[rule]\naction = \"deny\"\n", 1, "unclosed"),
        ("dry_run = 1\n", 1, "invalid type"),
        ("\n\nbogus = true\n", 3, "unknown field `bogus`"),
        (
            "[[rule]]\naction = \"deny\"\nport = [1]\n",
            3,
            "unknown field `port`",
        ),
        ("[[rule]]\nports = [1]\n", 1, "missing field `action`"),
        ("[[rule]]\naction = \"block\"\n", 2, "not an action"),
        (
            "[[rule]]\naction = \"deny\"\ndirection = \"out\"\n",
            3,
            "not a direction",
        ),
        (
            "[[rule]]\naction = \"deny\"\nports = [\"9-8\"]\n",
            3,
            "is empty",
        ),
        (
            "[[rule]]\naction = \"deny\"\nports = [70000]\n",
            3,
            "out of range",
        ),
        (
            "[[rule]]\naction = \"deny\"\nports = [\"http\"]\n",
            3,
            "not a port",
        ),
        ("[[rule]]\naction = \"deny\"\nports = [1.5]\n", 3, "number"),
        (
            "[[rule]]\naction = \"deny\"\ndestinations = [\"10.0.0.0/33\"]\n",
            3,
            "prefix length",
        ),
        (
            "[[rule]]\naction = \"deny\"\ndestinations = [\"10.0.0.1/8\"]\n",
            3,
            "bits set after the prefix",
        ),
        (
            "[[rule]]\naction = \"deny\"\ndestinations = [\"::ffff:10.0.0.0/104\"]\n",
            3,
            "IPv4-mapped",
        ),
        (
            "[[rule]]\naction = \"deny\"\ndestinations = [\"example.com\"]\n",
            3,
            "not a CIDR",
        ),
        (
            "[[rule]]\naction = \"allow\"\ndirection = \"outbound\"\nsources = [\"spiffe://td/a\"]\n",
            4,
            "outbound connections have none",
        ),
        (
            "[[rule]]\naction = \"allow\"\nsources = [\"spiffe://td/a\"]\n",
            3,
            "direction = \"inbound\"",
        ),
        (
            "[[rule]]\naction = \"allow\"\ndirection = \"inbound\"\nsources = [\"td/a\"]\n",
            4,
            "spiffe://",
        ),
        (
            "[[rule]]\naction = \"allow\"\ndirection = \"inbound\"\nsources = [\"spiffe://td/a*\"]\n",
            4,
            "wildcard",
        ),
        (
            "[[rule]]\naction = \"allow\"\ndirection = \"inbound\"\nsources = [\"spiffe://TD\"]\n",
            4,
            "trust domain",
        ),
        (
            "[defaults]\noutbound = \"audit\"\n",
            2,
            "audit is for rules",
        ),
        ("[defaults]\ninbound = \"maybe\"\n", 2, "not an action"),
        (
            "[[rule]]\nname = \"a\"\naction = \"deny\"\nports = [1]\n[[rule]]\nname = \"a\"\naction = \"deny\"\nports = [2]\n",
            6,
            "already used on line 1",
        ),
        // Contradictions: a later rule entirely inside an earlier one, opposite action.
        (
            "[[rule]]\naction = \"deny\"\ndestinations = [\"10.0.0.0/8\"]\n\n[[rule]]\naction = \"allow\"\ndestinations = [\"10.1.0.0/16\"]\nports = [443]\n",
            5,
            "can never match",
        ),
        (
            "[[rule]]\naction = \"allow\"\ndirection = \"inbound\"\nsources = [\"spiffe://td/ns/a/*\"]\n[[rule]]\naction = \"deny\"\ndirection = \"inbound\"\nsources = [\"spiffe://td/ns/a/sa/b\"]\n",
            5,
            "can never match",
        ),
        (
            "[[rule]]\naction = \"deny\"\nports = [\"1-100\"]\n[[rule]]\naction = \"audit\"\ndirection = \"outbound\"\nports = [\"5-6\"]\n",
            4,
            "can never match",
        ),
        (
            "[[destination]]\nports = [1]\n",
            1,
            "missing field `destinations`",
        ),
        ("[[destination]]\ndestinations = []\n", 2, "is empty"),
        (
            "[[destination]]\ndestinations = [\"10.0.0.0/8\"]\nretries = 3\n",
            3,
            "unknown field `retries`",
        ),
        (
            "[[destination]]\ndestinations = [\"10.0.0.0/8\"]\nconnect_retries = -1\n",
            3,
            "invalid value",
        ),
        (
            "\n[[destination]]\ndestinations = [\"10.0.0.0/8\"]\n\ncircuit_open_ms = 0\n",
            5,
            "at least 1 ms",
        ),
        (
            "[[destination]]\ndestinations = [\"10.0.0.0/8\"]\nmax_connections = 0\n",
            3,
            "refuse every connection",
        ),
        (
            "[[destination]]\ndestinations = [\"10.0.0.0/8\"]\ncircuit_open_ms = 500\ncircuit_open_max_ms = 100\n",
            4,
            "shorter than",
        ),
        (
            "[[destination]]\nname = \"a\"\ndestinations = [\"10.0.0.1/8\"]\n",
            3,
            "bits set after the prefix",
        ),
        (
            "[[destination]]\nname = \"a\"\ndestinations = [\"10.0.0.0/8\"]\n[[destination]]\nname = \"a\"\ndestinations = [\"10.0.0.0/8\"]\n",
            5,
            "already used on line 1",
        ),
    ];
    for (text, line, fragment) in cases {
        let err = parse(text).expect_err(text);
        assert_eq!(err.line, *line, "{text:?}: {err}");
        assert!(
            err.message.contains(fragment),
            "{text:?}: {err} should mention {fragment:?}"
        );
        assert!(!err.to_string().contains('\n'), "one line: {err}");
    }
}

/// Not contradictions: a narrower rule first, the same action, or a partial overlap.
#[test]
fn legitimate_overlaps_are_accepted() {
    for text in [
        "[[rule]]\naction = \"allow\"\ndestinations = [\"10.1.0.0/16\"]\n[[rule]]\naction = \"deny\"\ndestinations = [\"10.0.0.0/8\"]\n",
        "[[rule]]\naction = \"deny\"\ndestinations = [\"10.0.0.0/8\"]\n[[rule]]\naction = \"deny\"\ndestinations = [\"10.1.0.0/16\"]\n",
        "[[rule]]\naction = \"deny\"\nports = [\"1-100\"]\n[[rule]]\naction = \"allow\"\nports = [\"50-150\"]\n",
        "[[rule]]\naction = \"deny\"\ndirection = \"outbound\"\n[[rule]]\naction = \"allow\"\nports = [1]\n",
        "[[rule]]\naction = \"deny\"\ndestinations = [\"::/0\"]\n[[rule]]\naction = \"allow\"\ndestinations = [\"10.0.0.0/8\"]\n",
    ] {
        parse(text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
    }
}

/// Arbitrary bytes and mutations of a valid file never panic the parser.
#[test]
fn parser_never_panics_on_mutations() {
    let base = POLICY.as_bytes();
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let alphabet = b"[]=\"'-/*:.,0123456789abcdefz#\n \\{}";
    for _ in 0..3000 {
        let mut text = base.to_vec();
        for _ in 0..(next() % 8 + 1) {
            let at = (next() as usize) % text.len();
            match next() % 3 {
                0 => text[at] = alphabet[(next() as usize) % alphabet.len()],
                1 => {
                    text.remove(at);
                }
                _ => text.insert(at, alphabet[(next() as usize) % alphabet.len()]),
            }
        }
        if let Ok(s) = std::str::from_utf8(&text) {
            let _ = parse(s);
        }
    }
}

/// `servers` matches the verified identity of the server an outbound tunnel reached: the
/// expected server is allowed, any other identity and plaintext (no identity) fall through
/// to the next rule.
#[test]
fn servers_match_the_verified_server_identity() {
    let policy = parse(
        r#"
        [[rule]]
        name = "db-is-postgres"
        action = "allow"
        direction = "outbound"
        destinations = ["10.0.5.0/24"]
        servers = ["spiffe://example.org/ns/db/sa/postgres", "spiffe://example.org/ns/dba/*"]
        [[rule]]
        name = "db-nobody-else"
        action = "deny"
        direction = "outbound"
        destinations = ["10.0.5.0/24"]
        "#,
    )
    .unwrap();
    let dst: SocketAddr = "10.0.5.7:5432".parse().unwrap();
    let check = |server: Option<&str>| {
        let id: Option<SpiffeId> = server.map(|s| s.parse().unwrap());
        let d = policy.evaluate(&Request {
            direction: Direction::Outbound,
            peer: id.as_ref(),
            dst,
        });
        (policy.rule_label(&d, Direction::Outbound), d.refuse)
    };
    let allowed = ("db-is-postgres".to_string(), false);
    let denied = ("db-nobody-else".to_string(), true);
    assert_eq!(
        check(Some("spiffe://example.org/ns/db/sa/postgres")),
        allowed
    );
    assert_eq!(check(Some("spiffe://example.org/ns/dba/sa/x")), allowed);
    assert_eq!(check(Some("spiffe://example.org/ns/db/sa/other")), denied);
    assert_eq!(
        check(Some("spiffe://evil.example/ns/db/sa/postgres")),
        denied
    );
    assert_eq!(check(None), denied, "plaintext has no server identity");
    // Only the destinations the identity rule covers wait for the handshake.
    let waits = |dst: &str| {
        policy.depends_on_peer(&Request {
            direction: Direction::Outbound,
            peer: None,
            dst: dst.parse().unwrap(),
        })
    };
    assert!(waits("10.0.5.7:5432"));
    assert!(!waits("10.0.6.7:5432") && !waits("[2001:db8::1]:5432"));
}

#[test]
fn servers_need_an_outbound_rule() {
    for (text, line, fragment) in [
        (
            "[[rule]]\naction = \"allow\"\nservers = [\"spiffe://td/a\"]\n",
            3,
            "add direction = \"outbound\"",
        ),
        (
            "[[rule]]\naction = \"allow\"\ndirection = \"inbound\"\nservers = [\"spiffe://td/a\"]\n",
            4,
            "add direction = \"outbound\"",
        ),
        (
            "[[rule]]\naction = \"allow\"\ndirection = \"outbound\"\nservers = []\n",
            1,
            "`servers = []` is empty",
        ),
        (
            "[[rule]]\naction = \"allow\"\ndirection = \"outbound\"\nservers = [\"td/a\"]\n",
            4,
            "must start with spiffe://",
        ),
    ] {
        let e = parse(text).unwrap_err();
        assert_eq!(e.line, line, "{text}: {e}");
        assert!(e.message.contains(fragment), "{text}: {e}");
    }
}

/// A directory of its own under the system's temporary directory, removed on drop.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("sidecar-policy-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A policy file rewritten in place is seen by the watcher mid-write: emptied, then cut
/// inside a line. Neither may replace the policy in force (the empty one would allow
/// everything); the same text written aside and renamed over the file is taken.
#[test]
fn files_caught_half_written_are_refused_and_rename_is_taken() {
    use super::{Enforcer, LoadError, load};
    let dir = TempDir::new("half-written");
    let path = dir.0.join("policy.toml");
    let deny_db = "[[rule]]\nname = \"db\"\naction = \"deny\"\nports = [5432]\n";
    std::fs::write(&path, deny_db).unwrap();
    let enforcer = Enforcer::new(path.clone(), load(&path).unwrap(), None, None).unwrap();
    let db = Request {
        direction: Direction::Outbound,
        peer: None,
        dst: "10.0.0.1:5432".parse().unwrap(),
    };
    let denies_db = |e: &Enforcer| !e.check(&db).allowed;
    assert!(denies_db(&enforcer));

    let replacement =
        format!("# the new policy\n{deny_db}[[rule]]\naction = \"deny\"\nports = [6379]\n");
    let cut = replacement.find("6379").unwrap();
    for (partial, why) in [
        ("", "emptied"),
        ("\n  \n# a comment only\n", "comments only"),
        (&replacement[..cut], "cut inside a line"),
    ] {
        std::fs::write(&path, partial).unwrap();
        let err = block_on(enforcer.reload()).expect_err(why);
        let one_line = err.to_string();
        assert!(
            matches!(err, LoadError::Empty { .. } | LoadError::Truncated { .. }),
            "{why}: {one_line}"
        );
        assert!(
            one_line.contains("policy.toml") && !one_line.contains('\n'),
            "{one_line}"
        );
        assert!(denies_db(&enforcer), "{why}: the old policy stays in force");
    }
    assert!(matches!(load(&path), Err(LoadError::Truncated { .. })));

    let tmp = dir.0.join(".policy.toml.tmp");
    std::fs::write(&tmp, &replacement).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    block_on(enforcer.reload()).expect("a renamed-in file is whole");
    assert_eq!(enforcer.current().rules.len(), 2);
}

/// Runs a reload (async: a pod's goes to the node agent) to completion.
fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(f)
}
