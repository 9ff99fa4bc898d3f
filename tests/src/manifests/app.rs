//! The app containers of a meshed pod cannot send past the mesh: a raw socket sends without
//! `connect()`, so no connect hook sees it (no policy, no metadata refusal, no mTLS), and the
//! container runtime grants CAP_NET_RAW by default. Every container beside the pod sidecar
//! must drop it (or ALL) and must not add it back or run privileged.

use super::{
    Doc,
    pod::{containers, pods},
};

pub fn check(docs: &[Doc]) -> Vec<String> {
    let mut p = Vec::new();
    for pod in pods(docs) {
        let all = containers(&pod);
        if !all.iter().any(|c| c.mode().as_deref() == Some("proxy")) {
            continue;
        }
        for c in all.iter().filter(|c| c.mode().is_none()) {
            let l = c.label();
            let drop = c.capabilities("drop");
            if !drop.iter().any(|d| d == "ALL" || d == "NET_RAW") {
                p.push(format!(
                    "{l}: capabilities.drop lacks NET_RAW (or ALL): raw sockets bypass every \
                     connect hook"
                ));
            }
            let add = c.capabilities("add");
            if add.iter().any(|a| a == "ALL" || a == "NET_RAW") {
                p.push(format!(
                    "{l}: adds NET_RAW: raw sockets bypass every connect hook"
                ));
            }
            if c.security()["privileged"].as_bool() == Some(true) {
                p.push(format!(
                    "{l}: privileged: true (every capability, NET_RAW included)"
                ));
            }
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifests::testing::{PROXY_POD, edited, run_table};

    #[test]
    fn an_app_container_that_could_open_raw_sockets_is_a_complaint() {
        let app = "    - name: app\n      image: app\n";
        let with =
            |security: &str| edited(app, &format!("{app}      securityContext: {security}\n"));
        // The fixture's app drops ALL already; these replace that line.
        let fixture_app = "      securityContext: {capabilities: {drop: [ALL]}}\n";
        assert!(
            PROXY_POD.contains(fixture_app),
            "the fixture's app drops ALL"
        );
        let without = |s: String| s.replacen(fixture_app, "", 1);
        let cases = [
            ("the fixture", edited("", ""), None),
            (
                "drops only NET_RAW",
                without(with("{capabilities: {drop: [NET_RAW]}}")),
                None,
            ),
            (
                "drops nothing",
                without(edited("", "")),
                Some("container app: capabilities.drop lacks NET_RAW"),
            ),
            (
                "drops another capability",
                without(with("{capabilities: {drop: [NET_ADMIN]}}")),
                Some("capabilities.drop lacks NET_RAW"),
            ),
            (
                "adds it back",
                without(with("{capabilities: {drop: [ALL], add: [NET_RAW]}}")),
                Some("adds NET_RAW"),
            ),
            (
                "privileged",
                without(with("{privileged: true, capabilities: {drop: [ALL]}}")),
                Some("privileged: true"),
            ),
            (
                "a pod without the sidecar is not ours to judge",
                "kind: Pod\nmetadata: {name: p}\nspec: {containers: [{name: c}]}\n".to_string(),
                None,
            ),
        ];
        run_table(cases, check);
    }
}
