//! Embeds the eBPF object built by `cargo xtask build-ebpf`. A plain `cargo build` without it
//! fails here with a message that says so, instead of a confusing include error.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=SIDECAR_EBPF_OBJECT");
    println!("cargo:rerun-if-env-changed=CARGO_TARGET_DIR");
    let object = match std::env::var_os("SIDECAR_EBPF_OBJECT") {
        Some(path) => PathBuf::from(path),
        None => {
            let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap());
            let workspace = manifest.parent().unwrap().to_path_buf();
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| workspace.join("target"));
            let target = if target.is_absolute() {
                target
            } else {
                workspace.join(target)
            };
            // The test-only variant's object is built into a directory of its own
            // (xtask's `build_ebpf::FILLABLE_MAP_DIR`).
            let target = if std::env::var_os("CARGO_FEATURE_FILLABLE_MAP_FOR_TESTS").is_some() {
                target.join("fillable-map-ebpf")
            } else {
                target
            };
            target.join("bpfel-unknown-none/release/sidecar-ebpf")
        }
    };
    println!("cargo:rerun-if-changed={}", object.display());
    if !object.is_file() {
        panic!(
            "\n\nThe eBPF object is missing: {}\nBuild it first with `cargo xtask build-ebpf` \
             (it installs the nightly's rust-src and bpf-linker when needed), or run the whole \
             suite with `cargo xtask test`.\n\n",
            object.display()
        );
    }
    println!("cargo:rustc-env=SIDECAR_EBPF_OBJECT={}", object.display());
}
