//! Link options of the `aither` package's binaries.
//!
//! aitherctl is started once per `aitherctl run`, so its start-up is on every launch's path
//! (docs/performance.md, "aitherctl's start"). It is a position-independent executable (ASLR of
//! a binary root runs), so before `main` the loader (or, in the static build install.sh makes,
//! glibc's `_dl_relocate_static_pie`) applies ≈15,000 relative relocations. Packed as DT_RELR
//! (`-z pack-relative-relocs`: GNU ld ≥ 2.38, glibc ≥ 2.36, both in Debian 12) their table is a
//! few KiB instead of ≈360 KiB read at every start; the relocations applied, and so the
//! addresses and the read-only-after-relocation protection, are the same.

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    if os == "linux" && env == "gnu" {
        println!("cargo::rustc-link-arg-bin=aitherctl=-Wl,-z,pack-relative-relocs");
    }
}
