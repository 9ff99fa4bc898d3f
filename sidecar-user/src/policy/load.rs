//! A policy's text made ready to put in force: the whole-file checks, [`schema::parse`] and
//! [`kernel::compile`]. One path for every policy: `sidecar run` and `sidecar proxy` read
//! theirs from a file ([`load`]), the node agent takes a pod's from its sidecar
//! ([`from_text`]), so a policy one accepts the other accepts too.

use std::path::{Path, PathBuf};

use thiserror::Error;

use super::{
    kernel::{self, KernelPolicyError},
    rules::Policy,
    schema::{self, PolicyError},
};

#[derive(Debug, Error)]
pub enum LoadError {
    #[error("cannot read policy file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "policy file {path} is empty (or only comments), which is what a file caught \
         half-written looks like: to allow everything, say so with [defaults] outbound = \
         \"allow\" and inbound = \"allow\""
    )]
    Empty { path: PathBuf },
    #[error(
        "policy file {path} does not end with a line break, so it looks cut short: write the \
         new policy to a temporary file in the same directory and rename it over this one"
    )]
    Truncated { path: PathBuf },
    #[error("policy file {path} {error}")]
    Invalid { path: PathBuf, error: PolicyError },
    #[error("policy file {path}: {error}")]
    Kernel {
        path: PathBuf,
        error: KernelPolicyError,
    },
    /// The kernel half of a pod's policy is the node agent's, and it did not install it.
    /// `retry`: not a refusal of this policy but the agent's state (unreachable, the pod not
    /// registered right now): the same file is tried again.
    #[error("policy file {path}: the node agent did not install it: {error}")]
    Agent {
        path: PathBuf,
        error: String,
        retry: bool,
    },
}

impl LoadError {
    /// The node agent could not take the policy for a reason of its own (see
    /// [`LoadError::Agent`]): the same file is worth trying again.
    pub fn is_retry(&self) -> bool {
        matches!(self, LoadError::Agent { retry: true, .. })
    }
}

/// A policy read, validated and compiled for the kernel: everything that can fail before it
/// is put in force.
pub struct Loaded {
    pub policy: Policy,
    pub compiled: kernel::Compiled,
    /// The text it was read from (a pod's sidecar hands it to the node agent).
    pub text: String,
}

/// Reads, validates and compiles `path`.
pub fn load(path: &Path) -> Result<Loaded, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
        path: path.into(),
        source,
    })?;
    from_text(path, text)
}

/// Validates and compiles `text`, named `path` in errors (a file's path, or what the agent
/// calls a pod's policy).
pub fn from_text(path: &Path, text: String) -> Result<Loaded, LoadError> {
    check_whole(path, &text)?;
    let policy = schema::parse(&text).map_err(|error| LoadError::Invalid {
        path: path.into(),
        error,
    })?;
    let compiled = kernel::compile(&policy).map_err(|error| LoadError::Kernel {
        path: path.into(),
        error,
    })?;
    Ok(Loaded {
        policy,
        compiled,
        text,
    })
}

/// The file is polled, so a writer that truncates it and writes it in place can be read
/// mid-way: empty (which would parse as allow-everything) or cut inside a line. Both are
/// refused, and the old policy stays in force. A cut that falls exactly between two lines
/// cannot be told from a complete file, which is why the only safe update is to write a
/// temporary file and rename it over the policy (as kubelet does for a ConfigMap volume).
fn check_whole(path: &Path, text: &str) -> Result<(), LoadError> {
    let has_content = text.lines().any(|l| {
        let l = l.trim();
        !l.is_empty() && !l.starts_with('#')
    });
    if !has_content {
        return Err(LoadError::Empty { path: path.into() });
    }
    if !text.ends_with('\n') {
        return Err(LoadError::Truncated { path: path.into() });
    }
    Ok(())
}
