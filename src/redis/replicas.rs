//! Waiting for replicas: Redis `WAIT` after a script, on the connection that ran it.
//!
//! `WAIT n timeout` counts the replicas that have every write *this connection* made
//! so far, so it must follow the write on the same connection with nothing in between
//! that could reconnect. Sending both in one pipeline guarantees that: a reconnect
//! between two separate calls would make `WAIT` count on a fresh connection with no
//! writes, and answer "all replicas" at once.

use std::time::Duration;

use redis::{ErrorKind, FromRedisValue, ScriptInvocation, ServerErrorKind};

use super::Conn;
use crate::error::Error;

/// The longest replica wait: the shared connection gives up on a reply after 5 s, and
/// the script before the `WAIT` needs some of that.
const MAX_REPLICA_WAIT: Duration = Duration::from_secs(4);

impl Conn {
    /// Runs `inv`, then `WAIT replicas timeout`; returns the script's reply and how
    /// many replicas acknowledged. Fewer than asked is not an error here: the write is
    /// done either way, and the caller says what that means.
    pub(crate) async fn invoke_and_wait<T: FromRedisValue>(
        &self,
        inv: &ScriptInvocation<'_>,
        replicas: u32,
        timeout: Duration,
    ) -> Result<(T, u32), Error> {
        if matches!(self, Conn::Cluster(_)) {
            // redis-rs sends WAIT to every primary of a cluster, not down the
            // connection that wrote, so the count would not be about this write.
            return Err(Error::InvalidConfig(
                "waiting for replicas needs one primary (a redis:// or redis+sentinel:// URL), not a cluster".into(),
            ));
        }
        if timeout.is_zero() || timeout > MAX_REPLICA_WAIT {
            // WAIT 0 would block forever; past the response timeout the connection
            // would give up on the reply and the caller would not know the count.
            return Err(Error::InvalidConfig(format!(
                "replica wait {timeout:?}: it must be more than zero and at most {MAX_REPLICA_WAIT:?}"
            )));
        }
        let ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        let mut pipe = redis::pipe();
        pipe.invoke_script(inv).cmd("WAIT").arg(replicas).arg(ms);
        let mut conn = self.clone();
        let reply: Result<(T, u32), redis::RedisError> = pipe.query_async(&mut conn).await;
        match reply {
            // A pipeline does not load a missing script (a restarted or promoted
            // server has none): load it and send both again. Nothing ran the first time.
            Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                inv.load_async(&mut conn).await?;
                Ok(pipe.query_async(&mut conn).await?)
            }
            other => Ok(other?),
        }
    }
}
