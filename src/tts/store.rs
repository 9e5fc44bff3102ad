//! Where synthesised audio lives: a [`ResultStore`]. The job's result keeps only a
//! reference and metadata, so audio is stored once however many callers wait for it.
//!
//! Keys are content addresses (the request's dedup key), so a job that runs twice
//! after a lost lease overwrites its audio instead of leaving a second copy.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;

use crate::Queue;
use crate::redis::Conn;

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// Redis refused or lost the command.
    #[error("result store (Redis): {0}")]
    Redis(#[from] redis::RedisError),
    /// The filesystem refused.
    #[error("result store ({path}): {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A key that cannot name a stored object (empty, or with path separators).
    #[error("invalid result key {0:?}")]
    InvalidKey(String),
}

/// Stores audio by key. Object-safe and async (`async-trait`): the store is chosen at
/// run time and shared as `Arc<dyn ResultStore>`.
#[async_trait]
pub trait ResultStore: Send + Sync + fmt::Debug {
    /// Stores `bytes` under `key` for at least `ttl` (stores without expiry keep them
    /// until cleaned up); returns the reference to keep with the job.
    async fn put(&self, key: &str, bytes: &[u8], ttl: Duration) -> Result<String, StoreError>;

    /// The bytes behind a reference `put` returned, if they are still there.
    async fn get(&self, reference: &str) -> Result<Option<Vec<u8>>, StoreError>;

    /// Deletes what a reference points to; `true` if something was there.
    async fn delete(&self, reference: &str) -> Result<bool, StoreError>;
}

fn check_key(key: &str) -> Result<(), StoreError> {
    let ok = !key.is_empty()
        && key.len() <= 200
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !key.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(StoreError::InvalidKey(key.to_owned()))
    }
}

/// Audio in Redis, one binary-safe string per result with the result TTL, under the
/// queue's hash tag (so it lives on the queue's cluster node).
#[derive(Clone)]
pub struct RedisStore {
    conn: Conn,
    base: String,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("base", &self.base)
            .finish()
    }
}

impl RedisStore {
    /// A store beside `queue`'s keys, on its connection.
    pub fn new<J>(queue: &Queue<J>) -> Self {
        let shared = queue.shared();
        RedisStore {
            conn: shared.conn.clone(),
            base: format!("{}:audio:", shared.keys.base()),
        }
    }

    fn key(&self, reference: &str) -> Result<String, StoreError> {
        check_key(reference)?;
        Ok(format!("{}{reference}", self.base))
    }
}

#[async_trait]
impl ResultStore for RedisStore {
    async fn put(&self, key: &str, bytes: &[u8], ttl: Duration) -> Result<String, StoreError> {
        let full = self.key(key)?;
        let ms = ttl.as_millis().clamp(1, u64::MAX as u128) as u64;
        let () = redis::cmd("SET")
            .arg(&full)
            .arg(bytes)
            .arg("PX")
            .arg(ms)
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(key.to_owned())
    }

    async fn get(&self, reference: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let full = self.key(reference)?;
        Ok(redis::cmd("GET")
            .arg(full)
            .query_async(&mut self.conn.clone())
            .await?)
    }

    async fn delete(&self, reference: &str) -> Result<bool, StoreError> {
        let full = self.key(reference)?;
        let n: i64 = redis::cmd("DEL")
            .arg(full)
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(n > 0)
    }
}

/// Audio as files in a directory (`<dir>/<first two characters>/<key>`), for results
/// too large or too long-lived for Redis. Files do not expire by themselves: run
/// [`FileStore::cleanup_older_than`] periodically (for example as a periodic job).
#[derive(Debug, Clone)]
pub struct FileStore {
    dir: PathBuf,
}

impl FileStore {
    /// A store in `dir` (created on first write).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        FileStore { dir: dir.into() }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, key: &str) -> Result<PathBuf, StoreError> {
        check_key(key)?;
        let shard: String = key.chars().take(2).collect();
        Ok(self.dir.join(shard).join(key))
    }

    /// Deletes files last written more than `age` ago; returns how many.
    pub async fn cleanup_older_than(&self, age: Duration) -> Result<usize, StoreError> {
        let dir = self.dir.clone();
        let cutoff = SystemTime::now()
            .checked_sub(age)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        tokio::task::spawn_blocking(move || cleanup(&dir, cutoff))
            .await
            .map_err(|e| StoreError::Io {
                path: PathBuf::new(),
                source: std::io::Error::other(e),
            })?
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

fn cleanup(dir: &Path, cutoff: SystemTime) -> Result<usize, StoreError> {
    let mut removed = 0;
    let shards = match std::fs::read_dir(dir) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(io(dir)(e)),
    };
    for shard in shards {
        let shard = shard.map_err(io(dir))?.path();
        if !shard.is_dir() {
            continue;
        }
        for file in std::fs::read_dir(&shard).map_err(io(&shard))? {
            let path = file.map_err(io(&shard))?.path();
            let modified = std::fs::metadata(&path)
                .and_then(|m| m.modified())
                .map_err(io(&path))?;
            if modified < cutoff {
                std::fs::remove_file(&path).map_err(io(&path))?;
                removed += 1;
            }
        }
    }
    Ok(removed)
}

#[async_trait]
impl ResultStore for FileStore {
    async fn put(&self, key: &str, bytes: &[u8], _ttl: Duration) -> Result<String, StoreError> {
        let path = self.path(key)?;
        let parent = path
            .parent()
            .map(Path::to_owned)
            .unwrap_or_else(|| self.dir.clone());
        tokio::fs::create_dir_all(&parent)
            .await
            .map_err(io(&parent))?;
        // Write then rename: a reader never sees half a file, and a second run of the
        // same job replaces the first atomically.
        let tmp = parent.join(format!(".{key}.{}.tmp", uuid::Uuid::now_v7().simple()));
        tokio::fs::write(&tmp, bytes).await.map_err(io(&tmp))?;
        tokio::fs::rename(&tmp, &path).await.map_err(io(&path))?;
        Ok(key.to_owned())
    }

    async fn get(&self, reference: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let path = self.path(reference)?;
        match tokio::fs::read(&path).await {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(&path)(e)),
        }
    }

    async fn delete(&self, reference: &str) -> Result<bool, StoreError> {
        let path = self.path(reference)?;
        match tokio::fs::remove_file(&path).await {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io(&path)(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn file_store_round_trips_overwrites_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path());
        let r = store
            .put("abc123.wav", b"one", Duration::from_secs(1))
            .await
            .unwrap();
        store
            .put("abc123.wav", b"two", Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(store.get(&r).await.unwrap().as_deref(), Some(&b"two"[..]));
        assert!(dir.path().join("ab").join("abc123.wav").exists());
        assert_eq!(
            store
                .cleanup_older_than(Duration::from_secs(3600))
                .await
                .unwrap(),
            0
        );
        assert_eq!(store.cleanup_older_than(Duration::ZERO).await.unwrap(), 1);
        assert_eq!(store.get(&r).await.unwrap(), None);
        assert!(!store.delete(&r).await.unwrap());
        store.put(&r, b"three", Duration::ZERO).await.unwrap();
        assert!(store.delete(&r).await.unwrap());
        assert_eq!(store.get(&r).await.unwrap(), None);
    }

    #[tokio::test]
    async fn cleanup_skips_stray_files_and_a_store_never_written() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path().join("never"));
        assert_eq!(store.cleanup_older_than(Duration::ZERO).await.unwrap(), 0);
        let store = FileStore::new(dir.path());
        std::fs::write(dir.path().join("README"), b"not a shard").unwrap();
        store.put("xy.wav", b"a", Duration::ZERO).await.unwrap();
        assert_eq!(store.cleanup_older_than(Duration::ZERO).await.unwrap(), 1);
        assert!(dir.path().join("README").exists());
    }

    #[tokio::test]
    async fn only_a_missing_file_is_absent_other_io_errors_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path());
        // A directory where the audio should be: neither readable nor removable as a file.
        std::fs::create_dir_all(dir.path().join("ab").join("ab.wav")).unwrap();
        assert!(matches!(
            store.get("ab.wav").await,
            Err(StoreError::Io { .. })
        ));
        assert!(matches!(
            store.delete("ab.wav").await,
            Err(StoreError::Io { .. })
        ));
        // A store "directory" that is a file cannot be cleaned up.
        let file = dir.path().join("plain");
        std::fs::write(&file, b"x").unwrap();
        assert!(matches!(
            FileStore::new(&file)
                .cleanup_older_than(Duration::ZERO)
                .await,
            Err(StoreError::Io { .. })
        ));
    }

    #[test]
    fn keys_are_short_plain_names() {
        let long = "k".repeat(200);
        for key in ["a", "abc-1_2.wav", long.as_str()] {
            assert!(check_key(key).is_ok(), "{key}");
        }
        let longer = "k".repeat(201);
        for key in ["", ".wav", "a b", "ä", "a/b", "a\\b", longer.as_str()] {
            assert!(
                matches!(check_key(key), Err(StoreError::InvalidKey(k)) if k == key),
                "{key}"
            );
        }
    }

    #[tokio::test]
    async fn keys_cannot_escape_the_store() {
        let store = FileStore::new("/tmp/nowhere");
        for key in ["", "../etc/passwd", "a/b", ".hidden"] {
            assert!(
                matches!(store.get(key).await, Err(StoreError::InvalidKey(_))),
                "{key}"
            );
        }
    }
}
