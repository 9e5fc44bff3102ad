//! Redis Sentinel: the primary is wherever the sentinels say it is, asked again after
//! every failover, so producers and workers follow a promotion without a restart.
//!
//! redis-rs resolves a primary through the sentinels but has no reconnecting
//! connection for it (its `ConnectionManager` reconnects to one fixed address, which
//! after a failover is dead or a read-only replica). [`SentinelConn`] is that missing
//! piece: a shared multiplexed connection to the current primary, dropped when it
//! fails in a way that says "this is no longer the primary" (connection lost, timeout,
//! `READONLY`), and found again through the sentinels on the next command.
//!
//! A command is sent once and never replayed here: a script whose reply was lost may
//! have run, and only its caller knows whether running it again is safe. The caller
//! sees a transient error ([`crate::Error::is_transient`]) and retries, as workers
//! already do.

use std::sync::Arc;
use std::sync::Mutex as StdMutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{AsyncConnectionConfig, Cmd, ErrorKind, Pipeline, RedisError, RedisFuture, Value};

use crate::error::Error;

/// The URL scheme of a Sentinel deployment.
pub(crate) const SCHEME: &str = "redis+sentinel://";
const DEFAULT_SENTINEL_PORT: u16 = 26379;

/// Where the sentinels are and which primary to ask them for, parsed once.
#[derive(Clone)]
pub(crate) struct SentinelTarget {
    sentinels: Vec<String>,
    service: String,
    username: Option<String>,
    password: Option<String>,
    db: i64,
}

impl std::fmt::Debug for SentinelTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the password.
        f.debug_struct("SentinelTarget")
            .field("sentinels", &self.sentinels)
            .field("service", &self.service)
            .field("username", &self.username)
            .field("db", &self.db)
            .finish()
    }
}

impl SentinelTarget {
    /// Parses `redis+sentinel://[[user]:password@]host[:port][,host[:port]…]/service[/db]`.
    pub(crate) fn parse(url: &str) -> Result<Self, Error> {
        let bad = |why: &str| Error::InvalidConfig(format!("sentinel URL: {why}"));
        let rest = url
            .strip_prefix(SCHEME)
            .ok_or_else(|| bad("it must start with redis+sentinel://"))?;
        let (authority, path) = rest
            .split_once('/')
            .ok_or_else(|| bad("the primary's service name is missing (…/service)"))?;
        let (credentials, hosts) = match authority.rsplit_once('@') {
            Some((c, h)) => (Some(c), h),
            None => (None, authority),
        };
        let (username, password) = match credentials {
            None => (None, None),
            Some(c) => {
                let (user, pass) = c.split_once(':').unwrap_or(("", c));
                let user = percent_decode(user).ok_or_else(|| bad("bad %-escape"))?;
                let pass = percent_decode(pass).ok_or_else(|| bad("bad %-escape"))?;
                ((!user.is_empty()).then_some(user), Some(pass))
            }
        };
        let mut sentinels = Vec::new();
        for host in hosts.split(',').filter(|h| !h.is_empty()) {
            let (name, port) = match host.rsplit_once(':') {
                Some((n, p)) => (
                    n,
                    p.parse::<u16>()
                        .map_err(|_| bad(&format!("bad port in {host:?}")))?,
                ),
                None => (host, DEFAULT_SENTINEL_PORT),
            };
            sentinels.push(format!("redis://{name}:{port}"));
        }
        if sentinels.is_empty() {
            return Err(bad("no sentinel address"));
        }
        let (service, db) = match path.split_once('/') {
            Some((s, d)) if !d.is_empty() => (
                s,
                d.parse::<i64>()
                    .map_err(|_| bad(&format!("bad database number {d:?}")))?,
            ),
            Some((s, _)) => (s, 0),
            None => (path, 0),
        };
        if service.is_empty() {
            return Err(bad("the primary's service name is missing (…/service)"));
        }
        Ok(Self {
            sentinels,
            service: service.to_owned(),
            username,
            password,
            db,
        })
    }

    fn client(&self) -> Result<SentinelClient, Error> {
        let mut info = redis::RedisConnectionInfo::default().set_db(self.db);
        if let Some(user) = &self.username {
            info = info.set_username(user);
        }
        if let Some(pass) = &self.password {
            info = info.set_password(pass);
        }
        SentinelClient::build(
            self.sentinels.clone(),
            &self.service,
            Some(SentinelNodeConnectionInfo::default().set_redis_connection_info(info)),
            SentinelServerType::Master,
        )
        .map_err(Error::Connect)
    }
}

/// `%XX` escapes, so a password may hold `@`, `:` or `,`.
fn percent_decode(s: &str) -> Option<String> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        if b == b'%' {
            let hi = (bytes.next()? as char).to_digit(16)?;
            let lo = (bytes.next()? as char).to_digit(16)?;
            out.push(u8::try_from(hi * 16 + lo).ok()?);
        } else {
            out.push(b);
        }
    }
    String::from_utf8(out).ok()
}

/// A shared connection to whichever server the sentinels name primary now.
#[derive(Clone)]
pub(crate) struct SentinelConn {
    inner: Arc<Inner>,
}

struct Inner {
    target: SentinelTarget,
    /// Asked for the primary; one lookup at a time (it caches its sentinel links).
    sentinels: tokio::sync::Mutex<SentinelClient>,
    /// The live connection and its generation, so a failure drops only the connection
    /// it happened on, never a newer one another caller has already found.
    current: StdMutex<Option<(u64, MultiplexedConnection)>>,
    generations: AtomicU64,
    config: AsyncConnectionConfig,
    retries: usize,
    max_delay: Duration,
}

impl std::fmt::Debug for SentinelConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SentinelConn")
            .field("target", &self.inner.target)
            .finish()
    }
}

impl SentinelConn {
    /// Finds the primary and connects to it; `response_timeout` `None` waits as long as
    /// a reply takes (blocking commands). Lookups are retried `retries` times, with
    /// delays doubling up to `max_delay`, so a failover in progress is ridden out.
    pub(crate) async fn connect(
        target: &SentinelTarget,
        connect_timeout: Duration,
        response_timeout: Option<Duration>,
        retries: usize,
        max_delay: Duration,
    ) -> Result<Self, Error> {
        let conn = SentinelConn {
            inner: Arc::new(Inner {
                sentinels: tokio::sync::Mutex::new(target.client()?),
                target: target.clone(),
                current: StdMutex::new(None),
                generations: AtomicU64::new(0),
                config: AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(connect_timeout))
                    .set_response_timeout(response_timeout),
                retries,
                max_delay,
            }),
        };
        conn.current()
            .await
            .map_err(|e| super::connection::connect_error(e, target.username.as_deref()))?;
        Ok(conn)
    }

    fn cached(&self) -> Option<(u64, MultiplexedConnection)> {
        self.inner
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The connection to the primary, looked up through the sentinels when there is none.
    async fn current(&self) -> Result<(u64, MultiplexedConnection), RedisError> {
        if let Some(c) = self.cached() {
            return Ok(c);
        }
        let mut sentinels = self.inner.sentinels.lock().await;
        // Another caller may have connected while this one waited for the lock.
        if let Some(c) = self.cached() {
            return Ok(c);
        }
        let mut delay = Duration::from_millis(100);
        let mut attempt = 0;
        let conn = loop {
            let found = match sentinels.async_get_client().await {
                Ok(client) => {
                    client
                        .get_multiplexed_async_connection_with_config(&self.inner.config)
                        .await
                }
                Err(e) => Err(e),
            };
            match found {
                Ok(conn) => break conn,
                Err(e) if attempt < self.inner.retries => {
                    tracing::debug!(error = %e, "no primary from the sentinels yet; asking again");
                    attempt += 1;
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(self.inner.max_delay);
                }
                Err(e) => return Err(e),
            }
        };
        let mut slot = self
            .inner
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let generation = self.inner.generations.fetch_add(1, Ordering::Relaxed);
        *slot = Some((generation, conn.clone()));
        tracing::info!(service = %self.inner.target.service, "connected to the primary named by the sentinels");
        Ok((generation, conn))
    }

    /// Forgets the connection of `generation` after `error` if the error says the
    /// server behind it may no longer be the primary.
    fn after(&self, generation: u64, error: &RedisError) {
        if !means_not_primary(error) {
            return;
        }
        let mut slot = self
            .inner
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if slot.as_ref().is_some_and(|(g, _)| *g == generation) {
            tracing::warn!(error = %error, "lost the primary; asking the sentinels again");
            *slot = None;
        }
    }
}

/// Lost link, silence, or a demoted server: ask the sentinels again.
fn means_not_primary(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || matches!(e.code(), Some("READONLY" | "MASTERDOWN"))
        || matches!(e.kind(), ErrorKind::MasterNameNotFoundBySentinel)
}

impl ConnectionLike for SentinelConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let (generation, mut conn) = self.current().await?;
            let reply = conn.req_packed_command(cmd).await;
            if let Err(e) = &reply {
                self.after(generation, e);
            }
            reply
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let (generation, mut conn) = self.current().await?;
            let reply = conn.req_packed_commands(pipeline, offset, count).await;
            if let Err(e) = &reply {
                self.after(generation, e);
            }
            reply
        })
    }

    fn get_db(&self) -> i64 {
        self.inner.target.db
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sentinel_url_names_the_sentinels_the_service_and_the_primarys_credentials() {
        let t = SentinelTarget::parse(
            "redis+sentinel://app:p%40ss@10.0.0.1:26380,10.0.0.2,sentinel-3:5000/speech/2",
        )
        .unwrap();
        assert_eq!(
            t.sentinels,
            [
                "redis://10.0.0.1:26380",
                "redis://10.0.0.2:26379",
                "redis://sentinel-3:5000"
            ]
        );
        assert_eq!(t.service, "speech");
        assert_eq!(t.username.as_deref(), Some("app"));
        assert_eq!(t.password.as_deref(), Some("p@ss"));
        assert_eq!(t.db, 2);

        let t = SentinelTarget::parse("redis+sentinel://:secret@h:1/mymaster").unwrap();
        assert_eq!((t.username, t.password.as_deref()), (None, Some("secret")));
        assert_eq!(t.db, 0);

        // Escapes of every hex digit, either case; a slash after the service with no
        // database is database 0.
        let t = SentinelTarget::parse("redis+sentinel://u%3Ax:%2c%3a%7E@h/mymaster/").unwrap();
        assert_eq!(t.username.as_deref(), Some("u:x"));
        assert_eq!(t.password.as_deref(), Some(",:~"));
        assert_eq!((t.service.as_str(), t.db), ("mymaster", 0));
    }

    #[test]
    fn a_sentinel_url_without_service_or_sentinels_is_refused() {
        for url in [
            "redis+sentinel://h:26379",
            "redis+sentinel://h:26379/",
            "redis+sentinel:///mymaster",
            "redis+sentinel://h:port/mymaster",
            "redis+sentinel://h/mymaster/db",
            "redis://h/mymaster",
        ] {
            assert!(
                matches!(SentinelTarget::parse(url), Err(Error::InvalidConfig(_))),
                "{url}"
            );
        }
    }

    #[test]
    fn a_lost_link_or_a_demoted_server_means_asking_the_sentinels_again() {
        let server = |code: &str| redis::make_extension_error(code.to_owned(), None);
        assert!(means_not_primary(&server("READONLY")));
        assert!(means_not_primary(&server("MASTERDOWN")));
        // Any failure of the link, not only the kinds redis-rs calls "dropped".
        for kind in [
            std::io::ErrorKind::ConnectionReset,
            std::io::ErrorKind::InvalidData,
            std::io::ErrorKind::Other,
        ] {
            let io = RedisError::from(std::io::Error::from(kind));
            assert!(means_not_primary(&io), "{kind:?}");
        }
        // The server's answer about the command, not about its role: keep the link.
        for code in ["ERR", "NOPERM", "LOADING", "NOSCRIPT", "BUSY"] {
            assert!(!means_not_primary(&server(code)), "{code}");
        }
    }
}
