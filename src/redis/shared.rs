//! What one queue value shares with its clones and its workers: the connection, the
//! key layout and the script invocation (every script gets the queue's keys, Redis's
//! clock and the stream cap the same way).

use std::time::Duration;

use redis::{FromRedisValue, Script, ScriptInvocation};
use tokio::sync::OnceCell;

use crate::error::Error;
use crate::events::EventHub;
use crate::job::now_ms;
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
    pub(crate) fn invocation<'a>(&self, script: &'a Script) -> ScriptInvocation<'a> {
        let mut inv = script.prepare_invoke();
        for key in self.keys.all() {
            inv.key(key);
        }
        // The cap travels negated when step events are off (see common.lua).
        let cap = i64::try_from(self.config.events_max).unwrap_or(i64::MAX);
        inv.arg("")
            .arg(if self.config.step_events { cap } else { -cap });
        inv
    }

    pub(crate) async fn invoke<T: FromRedisValue>(
        &self,
        inv: &ScriptInvocation<'_>,
    ) -> Result<T, Error> {
        Ok(inv.invoke_async(&mut self.conn.clone()).await?)
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
