//! Waiting for replicas: Redis `WAIT` after a script, on the connection that ran it.
//!
//! `WAIT n timeout` counts the replicas that have every write *this connection* made
//! so far, so it must follow the write on the same connection with nothing in between
//! that could reconnect. Sending both in one pipeline guarantees that: a reconnect
//! between two separate calls would make `WAIT` count on a fresh connection with no
//! writes, and answer "all replicas" at once.

use std::time::Duration;

use redis::{ErrorKind, FromRedisValue, ServerErrorKind};

use super::shared::{Invocation, Shared};
use super::{Conn, scripts};
use crate::error::Error;

/// The longest replica wait: the shared connection gives up on a reply after 5 s, and
/// the script before the `WAIT` needs some of that.
const MAX_REPLICA_WAIT: Duration = Duration::from_secs(4);

impl Shared {
    /// Runs `inv`, then `WAIT replicas timeout`; returns the script's reply and how
    /// many replicas acknowledged. Fewer than asked is not an error here: the write is
    /// done either way, and the caller says what that means.
    pub(crate) async fn invoke_and_wait<T: FromRedisValue>(
        &self,
        inv: &Invocation<'_>,
        replicas: u32,
        timeout: Duration,
    ) -> Result<(T, u32), Error> {
        if matches!(self.conn, Conn::Cluster(_)) {
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
        let mut conn = self.conn.clone();
        // At most three tries: the first may find no library (or no script) on a
        // restarted or promoted server, or learn that functions are refused here.
        for _ in 0..3 {
            let mut pipe = redis::pipe();
            pipe.add_command(self.script_command(inv))
                .cmd("WAIT")
                .arg(replicas)
                .arg(ms);
            let failed = match pipe.query_async::<(T, u32)>(&mut conn).await {
                Ok(v) => return Ok(v),
                Err(e) => match first_server_error(e) {
                    // `WAIT` itself was refused (an ACL without `+wait`): the script
                    // ran, so nothing below applies; running it again would not help.
                    (Some(command), e) if command > 0 => return Err(e.into()),
                    (_, e) => e,
                },
            };
            // A pipeline loads nothing by itself; nothing ran when these come back.
            if self.scripts.functions() && scripts::is_function_missing(&failed) {
                match scripts::load_library().query_async::<()>(&mut conn).await {
                    Ok(()) => {}
                    Err(e) if scripts::is_functions_unavailable(&e) => {
                        self.scripts.functions_unavailable(&e)
                    }
                    Err(e) => return Err(e.into()),
                }
            } else if self.scripts.functions() && scripts::is_functions_unavailable(&failed) {
                self.scripts.functions_unavailable(&failed);
            } else if failed.kind() == ErrorKind::Server(ServerErrorKind::NoScript) {
                inv.transition
                    .script()
                    .prepare_invoke()
                    .load_async(&mut conn)
                    .await?;
            } else {
                return Err(failed.into());
            }
        }
        Err(Error::Protocol(
            "enqueue with replica wait: the script could not be loaded".into(),
        ))
    }
}

/// A pipeline's failure as the error of its first failing command, with that
/// command's place in the pipeline (`None` when no command answered an error): redis-rs
/// wraps server errors of a pipeline so that only their kind shows, not their text,
/// and "Function not found" is told apart by its text.
fn first_server_error(e: redis::RedisError) -> (Option<usize>, redis::RedisError) {
    match e.clone().into_server_errors() {
        Some(items) => match items.first() {
            Some((command, first)) => (Some(*command), first.clone().into()),
            None => (None, e),
        },
        None => (None, e),
    }
}

impl Shared {
    /// The one command that runs `inv`: `FCALL` while functions are to be had, else
    /// `EVALSHA` (which a pipeline cannot turn into a load on NOSCRIPT by itself).
    fn script_command(&self, inv: &Invocation<'_>) -> redis::Cmd {
        if self.scripts.functions() {
            inv.transition.fcall(inv.keys, &inv.args)
        } else {
            inv.transition.evalsha(inv.keys, &inv.args)
        }
    }
}
