//! Everything that speaks Redis: connections (single node, cluster, TLS), the key
//! layout, and the Lua scripts that are the queue's only state transitions.

mod connection;
mod keys;
mod scripts;

pub(crate) use connection::Conn;
pub use connection::{Connector, TlsConfig};
pub(crate) use keys::Keys;
pub(crate) use scripts::Scripts;
