//! Everything that speaks Redis: connections (single node, cluster, TLS), the key
//! layout, the Lua scripts that are the queue's only state transitions, and what a
//! queue value shares with its workers (connection, keys, script invocation).

mod connection;
mod keys;
mod scripts;
mod shared;

pub(crate) use connection::Conn;
pub use connection::{Connector, TlsConfig};
pub(crate) use keys::Keys;
pub(crate) use scripts::Scripts;
pub(crate) use shared::{QueueConfig, Shared};
