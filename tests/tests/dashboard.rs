//! The Grafana dashboard (`deploy/grafana/sidecar-dashboard.json`) queries only metrics the
//! sidecar exports: every metric name in every panel's query and in the dashboard's variables
//! must be a family of a real `/metrics` scrape of `sidecar run`, so renaming or removing a
//! metric fails here instead of leaving an empty panel in someone's Grafana.
//!
//! Resources: a `sidecar run -- sleep` with proxy and admin ports from `sidecar_tests::ports`.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    time::{Duration, Instant},
};

use serde_json::Value;
use sidecar_tests::{SidecarRun, privileged};
use sidecar_tests::{admin::http_get, ports};

/// Built in, so the test binary checks it wherever it runs (a vm-test guest has no checkout).
const DASHBOARD: &str = include_str!("../../deploy/grafana/sidecar-dashboard.json");

fn dashboard() -> Value {
    serde_json::from_str(DASHBOARD)
        .unwrap_or_else(|e| panic!("deploy/grafana/sidecar-dashboard.json is not JSON: {e}"))
}

/// Every panel that is not a row, rows' collapsed panels included.
fn panels(dashboard: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in dashboard["panels"].as_array().expect("a panels list") {
        if p["type"] == "row" {
            out.extend(p["panels"].as_array().into_iter().flatten());
        } else {
            out.push(p);
        }
    }
    out
}

/// Every PromQL expression, with where it comes from: panel targets and query variables.
fn queries(dashboard: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for p in panels(dashboard) {
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().unwrap_or_default();
            out.push((
                format!("panel {:?}", p["title"].as_str().unwrap_or_default()),
                expr.to_owned(),
            ));
        }
    }
    for v in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if v["type"] == "query" {
            let query = v["query"]["query"].as_str().or(v["query"].as_str());
            out.push((
                format!("variable {}", v["name"].as_str().unwrap_or_default()),
                query.unwrap_or_default().into(),
            ));
        }
    }
    out
}

/// The metric names in a PromQL expression: identifiers that start with `sidecar_` or
/// `process_`, outside quoted strings (label values, which may look like names).
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut ident = String::new();
    let mut quote: Option<char> = None;
    let mut escaped = false;
    let mut flush = |ident: &mut String| {
        if ident.starts_with("sidecar_") || ident.starts_with("process_") {
            names.insert(ident.clone());
        }
        ident.clear();
    };
    for c in expr.chars() {
        if let Some(q) = quote {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                _ if c == q => quote = None,
                _ => {}
            }
        } else if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
            ident.push(c);
        } else {
            flush(&mut ident);
            if matches!(c, '"' | '\'' | '`') {
                quote = Some(c);
            }
        }
    }
    flush(&mut ident);
    names
}

/// The family `name` belongs to in a scrape whose `# TYPE` lines gave `families` (name →
/// type): itself, or a histogram's (summary's) `_bucket`, `_sum` or `_count` series.
fn family<'a>(name: &'a str, families: &BTreeMap<String, String>) -> Option<&'a str> {
    if families.contains_key(name) {
        return Some(name);
    }
    ["_bucket", "_sum", "_count"].iter().find_map(|suffix| {
        let base = name.strip_suffix(suffix)?;
        let kind = families.get(base)?;
        (kind == "histogram" || (kind == "summary" && *suffix != "_bucket")).then_some(base)
    })
}

#[test]
fn metric_names_are_read_from_promql() {
    let expr = r#"histogram_quantile(0.99, sum by (le) (rate(sidecar_proxy_setup_seconds_bucket{instance=~"$instance", reason="sidecar_not_a_metric \" process_nope"}[$__rate_interval]))) / on() group_left process_open_fds"#;
    assert_eq!(
        metric_names(expr),
        BTreeSet::from([
            "process_open_fds".to_owned(),
            "sidecar_proxy_setup_seconds_bucket".to_owned()
        ])
    );
    let families = BTreeMap::from([
        ("sidecar_x_seconds".to_owned(), "histogram".to_owned()),
        ("sidecar_y_total".to_owned(), "counter".to_owned()),
    ]);
    assert_eq!(
        family("sidecar_x_seconds_bucket", &families),
        Some("sidecar_x_seconds")
    );
    assert_eq!(
        family("sidecar_y_total", &families),
        Some("sidecar_y_total")
    );
    assert_eq!(
        family("sidecar_y_total_count", &families),
        None,
        "a counter has no _count"
    );
    assert_eq!(family("sidecar_z_total", &families), None);
}

/// Valid Grafana JSON: a Prometheus data-source variable every panel uses, unique panel ids,
/// and a query behind every panel; and it covers what the dashboard is for.
#[test]
fn the_dashboard_is_grafana_json_on_the_datasource_variable() {
    let d = dashboard();
    assert!(
        d["schemaVersion"].as_u64().unwrap() >= 36,
        "Grafana 10 schema"
    );
    assert!(!d["uid"].as_str().unwrap().is_empty());
    let vars = d["templating"]["list"].as_array().unwrap();
    assert!(
        vars.iter().any(|v| v["type"] == "datasource"
            && v["name"] == "datasource"
            && v["query"] == "prometheus"),
        "no ${{datasource}} Prometheus variable"
    );
    let rows = d["panels"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["type"] == "row");
    let mut ids = BTreeSet::new();
    for p in rows.chain(panels(&d)) {
        assert!(
            ids.insert(p["id"].as_u64().unwrap()),
            "duplicate id {}",
            p["id"]
        );
    }
    for p in panels(&d) {
        let title = p["title"].as_str().unwrap();
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{title}");
        let targets = p["targets"]
            .as_array()
            .unwrap_or_else(|| panic!("{title}: no targets"));
        assert!(!targets.is_empty(), "{title}: no query");
        for t in targets {
            assert_eq!(t["datasource"]["uid"], "${datasource}", "{title}");
            let expr = t["expr"].as_str().unwrap_or_default();
            assert!(
                !metric_names(expr).is_empty(),
                "{title}: {expr:?} queries no metric"
            );
        }
    }
    let used: BTreeSet<String> = queries(&d)
        .iter()
        .flat_map(|(_, q)| metric_names(q))
        .collect();
    for needed in [
        "sidecar_connections_opened_total",
        "sidecar_connections_closed_total",
        "sidecar_connections_active",
        "sidecar_sent_bytes_total",
        "sidecar_received_bytes_total",
        "sidecar_proxy_setup_seconds_bucket",
        "sidecar_policy_decisions_total",
        "sidecar_tunnel_failures_total",
        "sidecar_connections_refused_total",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "sidecar_startup_seconds",
    ] {
        assert!(used.contains(needed), "no panel shows {needed}");
    }
}

/// Every metric the dashboard queries is a family of a real scrape of a ready sidecar.
#[test]
fn every_metric_the_dashboard_queries_is_in_a_real_scrape() {
    if !privileged() {
        return;
    }
    let [proxy, admin] = ports::take_each();
    let admin = SocketAddr::from(([127, 0, 0, 1], admin));
    let mut run = SidecarRun::builder(proxy)
        .arg(format!("--admin-addr={admin}"))
        .no_report()
        .command(["sleep", "60"])
        .start();
    let deadline = Instant::now() + Duration::from_secs(30);
    while http_get(admin, "/readyz").ok().map(|(s, _)| s) != Some(200) {
        assert!(
            Instant::now() < deadline,
            "never ready:\n{}",
            run.stderr_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (status, scrape) = http_get(admin, "/metrics").expect("GET /metrics");
    assert_eq!(status, 200);
    let families: BTreeMap<String, String> = scrape
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .map(|(name, kind)| (name.to_owned(), kind.to_owned()))
        .collect();
    assert!(families.contains_key("sidecar_ready"), "{scrape}");

    let queries = queries(&dashboard());
    let mut missing = Vec::new();
    let mut checked = BTreeSet::new();
    for (from, query) in &queries {
        for name in metric_names(query) {
            match family(&name, &families) {
                Some(f) => {
                    checked.insert(f.to_owned());
                }
                None => missing.push(format!("{from}: {name}")),
            }
        }
    }
    assert!(
        missing.is_empty(),
        "the dashboard queries metrics no scrape has:\n{}",
        missing.join("\n")
    );
    println!(
        "{} queries, {} metric families, all in the scrape",
        queries.len(),
        checked.len()
    );
    run.signal(libc::SIGTERM);
    let exit = run.wait_exit(Duration::from_secs(20));
    assert!(exit.is_some(), "the sidecar did not stop on SIGTERM");
}

/// The dashboard's kernel panels for a pod: on the simulated node, a pod sidecar's scrape has
/// every `sidecar_ebpf_connect_*` family the dashboard queries, with the pod's own values
/// (its two pass-through connects, none of the other pod's), and the agent's scrape has the
/// node-wide splice families (`sidecar_ebpf_sk_msg_*`: the sockmap is the node's, not a
/// pod's).
#[test]
fn a_pod_sidecars_kernel_panels_show_its_own_values() {
    let Some((_serial, node)) = sidecar_tests::node::setup("dashboard-pod") else {
        return;
    };
    let agent_admin = SocketAddr::from(([127, 0, 0, 1], ports::take()));
    let _agent = node.start_agent_in("agent", None, &[], &[format!("--admin-addr={agent_admin}")]);
    let a = node.pod("a", sidecar_tests::node::NS_A, sidecar_tests::node::ADDR_A);
    let b = node.pod("b", sidecar_tests::node::NS_B, sidecar_tests::node::ADDR_B);
    let proxy_a = node.start_proxy_passthrough(&a, "proxy-a", &[]);
    let proxy_b = node.start_proxy_passthrough(&b, "proxy-b", &[]);
    node.wait_ready(&a, &proxy_a);
    node.wait_ready(&b, &proxy_b);
    let _server = node.server(&b);
    node.app(&a, "client", &node.echo_args(64, 2))
        .success(sidecar_tests::node::STEP);
    let passed = "sidecar_ebpf_connect_passthrough_total 2";
    assert!(
        sidecar_tests::host::wait_until(sidecar_tests::node::STEP, || node
            .admin(&a, "/metrics")
            .1
            .lines()
            .any(|l| l == passed)),
        "pod A's sidecar never showed its own pass-through connects:\n{}",
        node.admin(&a, "/metrics").1
    );
    let scrape_a = node.admin(&a, "/metrics").1;
    let scrape_b = node.admin(&b, "/metrics").1;
    let (code, scrape_agent) = http_get(agent_admin, "/metrics").expect("the agent's /metrics");
    assert_eq!(code, 200);
    let families = |scrape: &str| -> BTreeMap<String, String> {
        scrape
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split_once(' '))
            .map(|(name, kind)| (name.to_owned(), kind.to_owned()))
            .collect()
    };
    let value = |scrape: &str, name: &str| -> Option<u64> {
        scrape
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse().ok())
    };
    let (pod, agent) = (families(&scrape_a), families(&scrape_agent));
    let kernel: BTreeSet<String> = queries(&dashboard())
        .iter()
        .flat_map(|(_, q)| metric_names(q))
        .filter(|n| n.starts_with("sidecar_ebpf_"))
        .collect();
    assert!(!kernel.is_empty());
    for name in &kernel {
        if name.starts_with("sidecar_ebpf_sk_msg_") {
            assert!(agent.contains_key(name), "{name} not in the agent's scrape");
        } else {
            assert!(
                pod.contains_key(name),
                "{name} not in pod A's scrape:\n{scrape_a}"
            );
        }
    }
    assert!(
        value(&scrape_a, "sidecar_ebpf_connect_seen_total") >= Some(2),
        "{scrape_a}"
    );
    assert_eq!(
        value(&scrape_b, "sidecar_ebpf_connect_passthrough_total"),
        Some(0),
        "pod B's sidecar shows pod A's connects, or none of its own counters:\n{scrape_b}"
    );
    assert!(
        value(&scrape_agent, "sidecar_ebpf_connect_passthrough_total") >= Some(2),
        "{scrape_agent}"
    );
}
