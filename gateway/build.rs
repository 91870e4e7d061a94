//! Embeds the kernel object built by `cargo xtask build-ebpf`.
//!
//! The object comes from `$GATEWAY_EBPF_OBJECT`, or from the kernel crate's
//! default output path. Without one, an empty file is embedded and the daemon
//! reports at start-up that the kernel path is unavailable, so `cargo check`
//! and `cargo clippy` work without bpf-linker.
use std::{env, fs, path::PathBuf};

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").unwrap()).join("gateway.bpf.o");
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let default = manifest.join("../gateway-ebpf/target/bpfel-unknown-none/release/gateway-ebpf");
    let src = env::var_os("GATEWAY_EBPF_OBJECT").map(PathBuf::from).unwrap_or(default);
    println!("cargo:rerun-if-env-changed=GATEWAY_EBPF_OBJECT");
    println!("cargo:rerun-if-changed={}", src.display());
    match fs::read(&src) {
        Ok(bytes) if !bytes.is_empty() => fs::write(&out, bytes).unwrap(),
        _ => {
            println!(
                "cargo:warning=no eBPF object at {}; run `cargo xtask build-ebpf` (the daemon will use the userspace relay)",
                src.display()
            );
            fs::write(&out, []).unwrap();
        }
    }
}
