//! What one queue value shares with its clones and its workers: the connection, the
//! key layout and the script invocation (every script gets the queue's keys, Redis's
//! clock and the stream cap the same way).

use std::time::Duration;

use redis::{FromRedisValue, ToRedisArgs};
use tokio::sync::OnceCell;

use crate::error::Error;
use crate::events::EventHub;
use crate::job::now_ms;
use crate::redis::scripts::{self, Transition};
use crate::redis::{Conn, Connector, Keys, Scripts};

/// Settings shared by every producer and worker of one queue value.
#[derive(Debug, Clone)]
pub(crate) struct QueueConfig {
    pub(crate) result_ttl: Duration,
    pub(crate) events_max: u64,
    /// `Some(0)` removes the cap, `None` leaves whatever the queue has in Redis.
    pub(crate) dead_cap: Option<u64>,
    /// Tests only: how far this handle pretends its host's clock is off. No script
    /// ever sees it (Redis's clock is the queue's only clock); it proves exactly that.
    pub(crate) host_clock_skew_ms: i64,
    /// Whether `queued`, `scheduled` and `active` events are written.
    pub(crate) step_events: bool,
}

/// What one queue value shares with its clones and its workers.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) name: String,
    pub(crate) keys: Keys,
    pub(crate) conn: Conn,
    pub(crate) connector: Connector,
    pub(crate) scripts: Scripts,
    pub(crate) config: QueueConfig,
    pub(crate) hub: OnceCell<EventHub>,
}

impl Shared {
    /// A script call with the queue's keys and the stream cap already given. The
    /// first argument is empty: scripts read Redis's own clock (`TIME`), never ours.
    pub(crate) fn invocation(&self, transition: &'static Transition) -> Invocation<'_> {
        let mut inv = Invocation {
            transition,
            keys: &self.keys.all()[..transition.keys],
            args: Vec::with_capacity(8),
        };
        // The cap travels negated when step events are off (see common.lua).
        let cap = i64::try_from(self.config.events_max).unwrap_or(i64::MAX);
        inv.arg("")
            .arg(if self.config.step_events { cap } else { -cap });
        inv
    }

    pub(crate) async fn invoke<T: FromRedisValue>(&self, inv: &Invocation<'_>) -> Result<T, Error> {
        self.invoke_on(&mut self.conn.clone(), inv).await
    }

    /// Runs a script call on `conn` (a connection of the caller's own, such as the
    /// heartbeat's): by `FCALL`, loading the library where the server has none, or by
    /// `EVALSHA` where functions are not to be had (see `scripts`).
    pub(crate) async fn invoke_on<T: FromRedisValue>(
        &self,
        conn: &mut Conn,
        inv: &Invocation<'_>,
    ) -> Result<T, Error> {
        if self.scripts.functions() {
            let fcall = inv.transition.fcall(inv.keys, &inv.args);
            let first = fcall.query_async::<T>(conn).await;
            let failed = match first {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            if scripts::is_function_missing(&failed) {
                match scripts::load_library().query_async::<()>(conn).await {
                    Ok(()) => {}
                    Err(e) if scripts::is_functions_unavailable(&e) => {
                        self.scripts.functions_unavailable(&e)
                    }
                    Err(e) => return Err(e.into()),
                }
                if self.scripts.functions() {
                    return Ok(fcall.query_async::<T>(conn).await?);
                }
            } else if scripts::is_functions_unavailable(&failed) {
                self.scripts.functions_unavailable(&failed);
            } else {
                return Err(failed.into());
            }
        }
        let mut eval = inv.transition.script().prepare_invoke();
        for key in inv.keys {
            eval.key(key);
        }
        for arg in &inv.args {
            eval.arg(arg.as_slice());
        }
        Ok(eval.invoke_async(conn).await?)
    }

    /// Redis's clock in ms since the epoch, for the few reads that compare against
    /// times the scripts stamped (stats windows, dead-letter cutoffs).
    pub(crate) async fn redis_now(&self) -> Result<u64, Error> {
        let (secs, micros): (u64, u64) = redis::cmd("TIME")
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(secs * 1000 + micros / 1000)
    }

    /// This host's clock, as far as this handle knows it (skewed in tests only).
    pub(crate) fn host_now(&self) -> u64 {
        now_ms().saturating_add_signed(self.config.host_clock_skew_ms)
    }

    /// The queue value's one event reader, started on first use.
    pub(crate) async fn hub(&self) -> Result<&EventHub, Error> {
        self.hub
            .get_or_try_init(|| EventHub::start(&self.connector, self.keys.events().to_owned()))
            .await
    }
}

/// One script call being built: a transition, the queue's keys and the arguments.
#[derive(Debug)]
pub(crate) struct Invocation<'a> {
    pub(super) transition: &'static Transition,
    pub(super) keys: &'a [String],
    pub(super) args: Vec<Vec<u8>>,
}

impl Invocation<'_> {
    /// Adds an argument (`ARGV[i]` in the script).
    pub(crate) fn arg<T: ToRedisArgs>(&mut self, arg: T) -> &mut Self {
        scripts::push_arg(&mut self.args, arg);
        self
    }
}
