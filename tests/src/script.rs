//! Pieces of the argv and `sh -c` scripts the tests hand a run as its workload.

use std::{fmt::Display, path::Path};

/// `--name=value`, one argv element.
pub fn arg(name: &str, value: impl Display) -> String {
    format!("{name}={value}")
}

/// Shell that waits (bounded, 2 minutes) for `file` to exist: how a test lets a script's
/// next step go once it has looked at the previous one.
pub fn wait_for_file(file: &Path) -> String {
    format!(
        "i=0; while [ ! -e {f} ] && [ $i -lt 1200 ]; do sleep 0.1; i=$((i+1)); done",
        f = file.display()
    )
}
