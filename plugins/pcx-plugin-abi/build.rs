// Records the target triple this crate is compiled for, so a plugin declares the target it was
// built for and the host can refuse a plugin built for another.
fn main() {
    let target = std::env::var("TARGET").unwrap_or_else(|_| "unknown".into());
    println!("cargo:rustc-env=PCX_PLUGIN_TARGET={target}");
    println!("cargo:rerun-if-changed=build.rs");
}
