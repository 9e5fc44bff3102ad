//! Connections: one node (plain or TLS through a `rediss://` URL), a primary found
//! through Redis Sentinel, or a cluster, behind one type so every other module is
//! written once.

use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Client, Cmd, Pipeline, RedisFuture, Value};

use super::sentinel::{SCHEME as SENTINEL_SCHEME, SentinelConn, SentinelTarget};
use crate::error::Error;

/// Long enough for a script over a large queue, short enough to notice a dead server.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Reconnection attempts per command before it fails: enough to ride out a Redis
/// restart or failover of a few seconds, short enough that a wrong URL fails fast.
const RECONNECT_RETRIES: usize = 4;
const RECONNECT_MAX_DELAY: Duration = Duration::from_secs(1);

/// Where the queue's Redis is: one server, a primary behind Redis Sentinel, or a cluster.
///
/// A `rediss://` URL gives TLS (rustls); a password or an ACL user goes in the URL
/// (`redis://user:secret@host:6379/0`). A `redis+sentinel://` URL names sentinels
/// instead of a server (see [`Connector::sentinel`]).
#[derive(Debug, Clone)]
pub struct Connector {
    kind: Kind,
}

#[derive(Debug, Clone)]
// Built once per queue: the size difference between the variants costs nothing.
#[allow(clippy::large_enum_variant)]
enum Kind {
    Single(Client),
    Sentinel(SentinelTarget),
    Cluster(ClusterClient),
}

impl Connector {
    /// One Redis server (or a proxy) at `url`.
    pub fn single(url: &str) -> Result<Self, Error> {
        let client = Client::open(url).map_err(Error::Connect)?;
        Ok(Self {
            kind: Kind::Single(client),
        })
    }

    /// One server by URL, whichever kind the scheme says: `redis://` or `rediss://`
    /// for one server ([`Connector::single`]), `redis+sentinel://` for a primary
    /// behind Sentinel ([`Connector::sentinel`]). What [`QueueBuilder::url`] uses.
    ///
    /// [`QueueBuilder::url`]: crate::QueueBuilder::url
    pub fn from_url(url: &str) -> Result<Self, Error> {
        if url.starts_with(SENTINEL_SCHEME) {
            Self::sentinel(url)
        } else {
            Self::single(url)
        }
    }

    /// The primary that Redis Sentinel names, by a URL of the form
    ///
    /// ```text
    /// redis+sentinel://[[user]:password@]host[:port][,host[:port]…]/service[/db]
    /// ```
    ///
    /// `host:port` are the *sentinels* (port 26379 by default; list several, any one
    /// answering is enough), `service` is the primary's name in the sentinels'
    /// configuration (`sentinel monitor <service> …`), and the credentials and database
    /// are the primary's (`%XX` escapes allowed). The sentinels themselves are asked
    /// without credentials; TLS to the primary is not offered through this URL.
    ///
    /// Why not a plain URL to the primary: after a failover that address is dead or a
    /// read-only replica. Here every connection asks the sentinels again when its
    /// primary stops answering, times out or answers `READONLY`, so producers and
    /// workers follow a failover on their own; the command that met the failure fails
    /// with a transient error ([`Error::is_transient`]) for its caller to retry (workers
    /// do). What a failover can lose, and how
    /// [`Enqueue::wait_for_replicas`](crate::Enqueue::wait_for_replicas) closes the gap,
    /// is in the README ("Sentinel, replication and `WAIT`").
    pub fn sentinel(url: &str) -> Result<Self, Error> {
        Ok(Self {
            kind: Kind::Sentinel(SentinelTarget::parse(url)?),
        })
    }

    /// One Redis server over TLS (`rediss://` URL) trusting `tls`'s CA instead of the
    /// system's roots, optionally with a client certificate (mutual TLS).
    pub fn single_tls(url: &str, tls: TlsConfig) -> Result<Self, Error> {
        let certs = redis::TlsCertificates {
            client_tls: tls
                .client
                .map(|(client_cert, client_key)| redis::ClientTlsConfig {
                    client_cert,
                    client_key,
                }),
            root_cert: tls.root_ca,
        };
        let client = Client::build_with_tls(url, certs).map_err(Error::Connect)?;
        Ok(Self {
            kind: Kind::Single(client),
        })
    }

    /// A Redis Cluster reached through any of `urls`.
    ///
    /// Every key of one queue lives in one slot (the queue name is the hash tag), so
    /// queues spread over the cluster's nodes and each script still runs on one node.
    pub fn cluster<I, S>(urls: I) -> Result<Self, Error>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let nodes: Vec<String> = urls.into_iter().map(|u| u.as_ref().to_owned()).collect();
        let client = ClusterClient::builder(nodes)
            .connection_timeout(CONNECT_TIMEOUT)
            .response_timeout(RESPONSE_TIMEOUT)
            .build()
            .map_err(Error::Connect)?;
        Ok(Self {
            kind: Kind::Cluster(client),
        })
    }

    /// Whether this is a cluster (blocking on several queues then needs one wait each).
    pub(crate) fn is_cluster(&self) -> bool {
        matches!(self.kind, Kind::Cluster(_))
    }

    /// A shared, reconnecting connection for ordinary commands and scripts.
    pub(crate) async fn connect(&self) -> Result<Conn, Error> {
        match &self.kind {
            Kind::Single(client) => manager(client, Some(RESPONSE_TIMEOUT)).await,
            Kind::Sentinel(target) => sentinel(target, Some(RESPONSE_TIMEOUT)).await,
            Kind::Cluster(client) => Ok(Conn::Cluster(
                client
                    .get_async_connection()
                    .await
                    .map_err(|e| connect_error(e, None))?,
            )),
        }
    }

    /// A connection of its own for blocking commands (BLPOP, XREAD BLOCK), which would
    /// stall every other caller of a shared multiplexed connection.
    pub(crate) async fn connect_blocking(&self) -> Result<Conn, Error> {
        match &self.kind {
            Kind::Single(client) => manager(client, None).await,
            Kind::Sentinel(target) => sentinel(target, None).await,
            Kind::Cluster(client) => {
                // Blocking commands wait at most a few seconds by our own timeouts.
                let config = ClusterConfig::new().set_response_timeout(Duration::from_secs(3600));
                let conn = client
                    .get_async_connection_with_config(config)
                    .await
                    .map_err(|e| connect_error(e, None))?;
                Ok(Conn::Cluster(conn))
            }
        }
    }
}

/// A reconnecting connection to one node; `None` waits for replies as long as it takes
/// (blocking commands bound their own wait).
async fn manager(client: &Client, response_timeout: Option<Duration>) -> Result<Conn, Error> {
    let config = ConnectionManagerConfig::new()
        .set_response_timeout(response_timeout)
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_number_of_retries(RECONNECT_RETRIES)
        .set_max_delay(RECONNECT_MAX_DELAY);
    let manager = client
        .get_connection_manager_with_config(config)
        .await
        .map_err(|e| connect_error(e, client.get_connection_info().redis_settings().username()))?;
    Ok(Conn::Single(manager))
}

/// A failed first connection as its error: refused credentials and ACL refusals typed
/// (naming the URL's user), anything else [`Error::Connect`].
pub(crate) fn connect_error(e: redis::RedisError, user: Option<&str>) -> Error {
    match crate::error::classify(e) {
        Ok(Error::AuthFailed { .. }) => Error::AuthFailed {
            user: user.map(str::to_owned),
        },
        Ok(typed) => typed,
        Err(e) => Error::Connect(e),
    }
}

/// A connection to the primary the sentinels name, found again after a failover.
async fn sentinel(
    target: &SentinelTarget,
    response_timeout: Option<Duration>,
) -> Result<Conn, Error> {
    let conn = SentinelConn::connect(
        target,
        CONNECT_TIMEOUT,
        response_timeout,
        RECONNECT_RETRIES,
        RECONNECT_MAX_DELAY,
    )
    .await?;
    Ok(Conn::Sentinel(conn))
}

/// Certificates for [`Connector::single_tls`], all PEM.
#[derive(Clone, Default)]
pub struct TlsConfig {
    root_ca: Option<Vec<u8>>,
    client: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("TlsConfig")
            .field("root_ca", &self.root_ca.is_some())
            .field("client_identity", &self.client.is_some())
            .finish()
    }
}

impl TlsConfig {
    /// System roots only (what a plain `rediss://` URL does).
    pub fn new() -> Self {
        Self::default()
    }

    /// Trusts this CA (a private CA, as managed Redis services and self-hosted TLS use).
    pub fn root_ca(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.root_ca = Some(pem.into());
        self
    }

    /// Presents this client certificate and key (mutual TLS).
    pub fn client_identity(
        mut self,
        cert_pem: impl Into<Vec<u8>>,
        key_pem: impl Into<Vec<u8>>,
    ) -> Self {
        self.client = Some((cert_pem.into(), key_pem.into()));
        self
    }
}

/// A live connection of either kind.
#[derive(Clone)]
pub(crate) enum Conn {
    Single(ConnectionManager),
    Sentinel(SentinelConn),
    Cluster(ClusterConnection),
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Conn::Single(_) => f.write_str("Conn::Single"),
            Conn::Sentinel(c) => c.fmt(f),
            Conn::Cluster(_) => f.write_str("Conn::Cluster"),
        }
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Sentinel(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Sentinel(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Sentinel(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}
