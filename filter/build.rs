//! Build script: strips the wasm `name` section from the cdylib.
//!
//! Cargo does not apply `strip = "symbols"` (nor LTO) to a library whose crate types
//! include `rlib`, so the release `hopwatch_filter.wasm` would otherwise carry ~65 KB
//! of function names. `--strip-all` is a wasm-ld option.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=HOPWATCH_KEEP_NAMES");
    if std::env::var_os("HOPWATCH_KEEP_NAMES").is_some() {
        return;
    }
    let target = std::env::var("TARGET").unwrap_or_default();
    let profile = std::env::var("PROFILE").unwrap_or_default();
    if target.starts_with("wasm32-wasi") && profile == "release" {
        println!("cargo:rustc-link-arg-cdylib=--strip-all");
    }
}
