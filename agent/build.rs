//! Builds the kernel programs (ebpf/vigie-ebpf) for the BPF target whenever the agent is
//! built, so `cargo build` is the only step a newcomer needs. Needs the nightly toolchain with
//! rust-src and bpf-linker; `cargo xtask setup` installs both.
fn main() -> anyhow::Result<()> {
    // aya-build watches the kernel crate's directory only; the records and constants the
    // kernel programs share with the agent live in vigie-common, and a change there must
    // rebuild both sides (a stale kernel object would disagree on layouts and limits).
    println!("cargo:rerun-if-changed={}/../ebpf/vigie-common", env!("CARGO_MANIFEST_DIR"));
    let ebpf = aya_build::Package {
        name: "vigie-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../ebpf/vigie-ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([ebpf], aya_build::Toolchain::Nightly)
}
