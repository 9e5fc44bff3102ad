//! The one integration-test binary (each extra binary is another full link): one
//! module per concern, all against a real Redis.

mod acl;
#[cfg(feature = "candle")]
mod candle;
mod chaos;
mod cluster;
mod common;
mod crash;
mod dead_letter;
mod dedup;
mod durability;
mod holes;
#[cfg(feature = "candle")]
mod kokoro;
mod memory;
mod metrics;
mod partition;
#[cfg(feature = "candle")]
mod piper;
mod profile;
mod props;
mod queue;
mod schedule;
mod sentinel;
mod transitions;
mod tts;
mod worker;
