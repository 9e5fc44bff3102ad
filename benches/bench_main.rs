//! Run with: `cargo bench` (needs Redis on 127.0.0.1:6379, or `REDIS_URL`).
//!
//! Criterion benches of the hot paths, one file per path. Names carry the device
//! (`cpu`); queue benches carry the Redis they ran against (`redis-local`).
//! `scripts/bench-queue` prints the queue's figures as ratios to Redis's own LPUSH
//! rate, measured against the same server in the same run.

use criterion::criterion_main;

mod audio;
#[cfg(feature = "candle")]
mod candle;
mod cluster;
#[cfg(feature = "candle")]
mod kokoro;
#[cfg(feature = "candle")]
mod piper;
mod queue;
#[cfg(feature = "candle")]
mod realtime;
mod text;

#[cfg(feature = "candle")]
criterion_main!(
    queue::queue_figures,
    cluster::cluster_figures,
    queue::benches,
    text::benches,
    audio::benches,
    candle::benches,
    piper::benches,
    kokoro::benches
);
#[cfg(not(feature = "candle"))]
criterion_main!(
    queue::queue_figures,
    cluster::cluster_figures,
    queue::benches,
    text::benches,
    audio::benches
);
