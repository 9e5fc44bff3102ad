//! Tells the crate whether it is being optimised.
//!
//! The fused CPU kernels of the Candle voices (`src/tts/candle/fused.rs`) are loops
//! of this crate: optimised they beat Candle's op-by-op chain, unoptimised they lose
//! to it (Candle comes optimised as a dependency even in a dev build). Debug
//! assertions say nothing about optimisation (the benches build the dev profile at
//! `opt-level = 3`), so the build script passes the profile's own opt-level on.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(voxqueue_optimized)");
    println!("cargo::rerun-if-changed=build.rs");
    // Cargo gives a build script the opt-level of the profile the crate builds with.
    let level = std::env::var("OPT_LEVEL").unwrap_or_default();
    if level != "0" && !level.is_empty() {
        println!("cargo::rustc-cfg=voxqueue_optimized");
    }
}
