//! Everything that speaks Redis: connections (single node, Sentinel, cluster, TLS), the key
//! layout, the Lua scripts that are the queue's only state transitions, and what a
//! queue value shares with its workers (connection, keys, script invocation).

mod acl;
mod connection;
mod keys;
mod replicas;
mod scripts;
mod sentinel;
mod shared;

pub use acl::acl_rules;
pub(crate) use connection::Conn;
pub use connection::{Connector, TlsConfig};
pub(crate) use keys::Keys;
pub(crate) use scripts::Scripts;
pub(crate) use shared::{QueueConfig, Shared};
