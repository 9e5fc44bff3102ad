//! Least privilege: a Redis ACL user limited to one key prefix and the commands voxqueue
//! sends (the README's `ACL SETUSER` line) runs a queue end to end; a wrong password and a
//! missing permission fail with a typed error that says what is missing.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use voxqueue::{AclMissing, Error, JobError, JobId, JobState, Queue, Worker, handler_fn};

use crate::common::{Prefix, RedisServer, redis_url, shutdown};

/// Every command voxqueue's queue, worker and scripts send (scripts run with the caller's
/// permissions, so the commands inside the Lua scripts count too). Kept in step with the
/// README's "Least privilege" section.
const COMMANDS: &[&str] = &[
    // Scripts: functions of one library (FCALL, loaded again after "Function not
    // found"); by SHA where functions are refused (loaded again after NOSCRIPT).
    "fcall",
    "function|load",
    "evalsha",
    "eval",
    "script|load",
    // Reads and waits outside scripts.
    "blpop",
    "xread",
    "xrange",
    "xrevrange",
    "hget",
    "hmget",
    "hgetall",
    "hkeys",
    "zcard",
    "zcount",
    "zrangebyscore",
    "zrevrange",
    "zscore",
    "exists",
    "get",
    "mget",
    "smembers",
    "time",
    // Writes outside scripts (results, streams, catalogue).
    "set",
    "del",
    "hset",
    "hdel",
    "xadd",
    "pexpire",
    "sadd",
    "srem",
    // Inside the Lua scripts.
    "zadd",
    "zrem",
    "zpopmin",
    "zrange",
    "incr",
    "incrby",
    "hincrby",
    "llen",
    "ltrim",
    "rpush",
    "lpush",
    "lpop",
    "lrem",
    // Connection setup by redis-rs.
    "ping",
];

/// A Redis ACL user that exists for one test; deleted on drop.
struct AclUser {
    name: String,
    password: String,
}

impl AclUser {
    /// Creates a user allowed `commands` on keys under `prefix` only.
    fn create(prefix: &str, commands: &[&str]) -> Self {
        let user = AclUser {
            name: format!("vqacl-{}", uuid::Uuid::new_v4().simple()),
            password: format!("pw-{}", uuid::Uuid::new_v4().simple()),
        };
        let mut cmd = redis::cmd("ACL");
        cmd.arg("SETUSER")
            .arg(&user.name)
            .arg("reset")
            .arg("on")
            .arg(format!(">{}", user.password))
            .arg(format!("~{prefix}:*"))
            .arg("resetchannels")
            .arg("-@all");
        for c in commands {
            cmd.arg(format!("+{c}"));
        }
        let _: () = cmd.query(&mut admin()).expect("ACL SETUSER");
        user
    }

    fn url(&self, password: &str) -> String {
        redis_url().replacen("redis://", &format!("redis://{}:{password}@", self.name), 1)
    }
}

impl Drop for AclUser {
    fn drop(&mut self) {
        let _: Result<i64, _> = redis::cmd("ACL")
            .arg("DELUSER")
            .arg(&self.name)
            .query(&mut admin());
    }
}

fn admin() -> redis::Connection {
    redis::Client::open(redis_url())
        .unwrap()
        .get_connection()
        .unwrap()
}

#[derive(Debug, Serialize, Deserialize)]
struct Greet {
    name: String,
}

async fn connect(p: &Prefix, url: &str) -> Result<Queue<Greet>, Error> {
    Queue::<Greet>::builder("acl")
        .url(url)
        .prefix(&p.name)
        .connect()
        .await
}

#[tokio::test]
async fn a_user_limited_to_the_prefix_and_the_commands_runs_a_queue() {
    let p = Prefix::new();
    let user = AclUser::create(&p.name, COMMANDS);
    let q = connect(&p, &user.url(&user.password)).await.unwrap();
    greets_ada(&q).await;
    assert_eq!(q.stats().await.unwrap().dead, 0);
}

/// One job through a worker on `q`: enqueued, run, its result read back.
async fn greets_ada(q: &Queue<Greet>) {
    let job = q.enqueue(Greet { name: "Ada".into() }).await.unwrap();
    let worker = Worker::builder(q.clone())
        .shutdown_grace(Duration::from_millis(100))
        .build(handler_fn(|job: Greet, _ctx| async move {
            Ok::<_, JobError>(format!("hello, {}", job.name))
        }));
    let (stop, stopped) = shutdown();
    let running = tokio::spawn(worker.run_until(stopped));
    let greeting: String = q
        .wait_result(&job.id, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(greeting, "hello, Ada");
    let _ = stop.send(());
    running.await.unwrap().unwrap();
}

#[test]
fn the_librarys_rules_are_the_tested_commands() {
    let mut expected = "~pfx:* resetchannels -@all".to_owned();
    for c in COMMANDS {
        expected.push_str(&format!(" +{c}"));
    }
    assert_eq!(voxqueue::acl_rules("pfx"), expected);
}

#[tokio::test]
async fn a_wrong_password_is_a_typed_error_naming_the_user() {
    let p = Prefix::new();
    let user = AclUser::create(&p.name, COMMANDS);
    let err = match connect(&p, &user.url("not-the-password")).await {
        Ok(q) => q.enqueue(Greet { name: "x".into() }).await.unwrap_err(),
        Err(e) => e,
    };
    match &err {
        Error::AuthFailed { user: Some(name) } => assert_eq!(*name, user.name),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        err.to_string(),
        format!(
            "Redis refused the credentials of user {:?}: wrong password, or no such user, \
             or the user is off (ACL SETUSER <user> on >password)",
            user.name
        )
    );
}

/// The hint every ACL refusal carries: the whole rule set, with the prefix to fill in.
fn hint() -> String {
    format!(
        "The user needs: {} (README, \"Least privilege\"); ACL LOG on the server names the exact command or key.",
        voxqueue::acl_rules("<prefix>")
    )
}

#[tokio::test]
async fn a_missing_command_is_refused_naming_the_command() {
    let p = Prefix::new();
    let without: Vec<&str> = COMMANDS
        .iter()
        .copied()
        .filter(|c| !["fcall", "evalsha"].contains(c))
        .collect();
    let user = AclUser::create(&p.name, &without);
    let q = connect(&p, &user.url(&user.password)).await.unwrap();
    let err = q.enqueue(Greet { name: "x".into() }).await.unwrap_err();
    match &err {
        Error::NoPermission { missing, .. } => {
            assert_eq!(*missing, AclMissing::Command("evalsha".into()))
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        err.to_string(),
        format!(
            "Redis ACL refused the command \"evalsha\": add +evalsha. {} Redis said: \
             this user has no permissions to run the 'evalsha' command",
            hint()
        )
    );
}

#[tokio::test]
async fn a_command_missing_inside_a_script_is_refused_with_the_rules_it_needs() {
    let p = Prefix::new();
    let without: Vec<&str> = COMMANDS.iter().copied().filter(|c| *c != "rpush").collect();
    let user = AclUser::create(&p.name, &without);
    let q = connect(&p, &user.url(&user.password)).await.unwrap();
    let err = q.enqueue(Greet { name: "x".into() }).await.unwrap_err();
    // Redis names neither the command nor the key for a call inside a script, only the
    // script's SHA and line; the error lists every rule the user needs instead.
    match &err {
        Error::NoPermission { missing, server } => {
            assert_eq!(*missing, AclMissing::ScriptCommand);
            assert!(
                server.starts_with(
                    "The user executing the script can't run this command or subcommand"
                ),
                "{server}"
            );
        }
        other => panic!("{other:?}"),
    }
    let text = err.to_string();
    assert!(
        text.starts_with(&format!(
            "Redis ACL refused a command inside a voxqueue script (Redis does not say which). {}",
            hint()
        )),
        "{text}"
    );
    assert!(text.contains(" +rpush "), "{text}");
}

#[tokio::test]
async fn a_key_outside_the_pattern_is_refused_naming_the_pattern() {
    let p = Prefix::new();
    let user = AclUser::create(&p.name, COMMANDS);
    let other = Prefix::new();
    let err = connect(&other, &user.url(&user.password))
        .await
        .unwrap()
        .enqueue(Greet { name: "x".into() })
        .await
        .unwrap_err();
    // The server does not say which key; the error says which pattern covers them all.
    match &err {
        Error::NoPermission { missing, .. } => assert_eq!(*missing, AclMissing::Key),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        err.to_string(),
        format!(
            "Redis ACL refused a key outside the user's key patterns (Redis does not say \
             which; the queue's keys are <prefix>:*). {} Redis said: this user has no \
             permissions to access one of the keys used as arguments",
            hint()
        )
    );
}

/// A user on `server` allowed `commands` on `p`'s keys only; its URL.
fn user_on(server: &RedisServer, p: &Prefix, name: &str, commands: &[&str]) -> String {
    let mut cmd = redis::cmd("ACL");
    cmd.arg("SETUSER")
        .arg(name)
        .arg("reset")
        .arg("on")
        .arg(">pw")
        .arg(format!("~{}:*", p.name))
        .arg("resetchannels")
        .arg("-@all");
    for c in commands {
        cmd.arg(format!("+{c}"));
    }
    let mut admin = redis::Client::open(server.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let _: () = cmd.query(&mut admin).expect("ACL SETUSER");
    server
        .url()
        .replacen("redis://", &format!("redis://{name}:pw@"), 1)
}

#[tokio::test]
async fn a_user_who_may_not_load_functions_runs_a_queue_through_scripts() {
    // A fresh server has no library yet, and this user may call functions but not
    // load them: the first call falls back to scripts by SHA.
    let server = RedisServer::start(&[]);
    let p = Prefix::on(&server.url());
    let commands: Vec<&str> = COMMANDS
        .iter()
        .copied()
        .filter(|&c| c != "function|load")
        .collect();
    let url = user_on(&server, &p, "no-function-load", &commands);
    let q = connect(&p, &url).await.unwrap();
    greets_ada(&q).await;
}

#[tokio::test]
async fn a_user_who_may_not_load_functions_waits_for_replicas_through_scripts() {
    // The replica wait runs the script in a pipeline, which loads nothing by itself:
    // on a fresh server the library is missing, loading it is refused, and the
    // script by SHA is missing too before it runs.
    waits_for_replicas_without("function|load", "no-function-load").await;
}

#[tokio::test]
async fn a_user_refused_fcall_waits_for_replicas_through_scripts() {
    // This user may load the library but not call it: the refusal is read as
    // "functions unavailable", not as a missing library to load again and again.
    waits_for_replicas_without("fcall", "no-fcall").await;
}

/// A user with the library's rules less `refused`, plus `wait`, enqueues with a
/// replica wait on a fresh server and the job is stored.
async fn waits_for_replicas_without(refused: &str, user: &str) {
    let server = RedisServer::start(&[]);
    let p = Prefix::on(&server.url());
    let mut commands: Vec<&str> = COMMANDS.iter().copied().filter(|&c| c != refused).collect();
    commands.push("wait");
    let url = user_on(&server, &p, user, &commands);
    let q = connect(&p, &url).await.unwrap();
    let id = JobId::new("waited").unwrap();
    q.enqueue(Greet { name: "Ada".into() })
        .id(id.clone())
        .wait_for_replicas(0, Duration::from_millis(100))
        .await
        .unwrap();
    assert_eq!(q.status(&id).await.unwrap().state, JobState::Queued);
}

#[tokio::test]
async fn a_replica_wait_refused_by_the_acl_names_wait_and_the_job_is_stored() {
    // The library's rules leave out `wait`: the script runs, `WAIT` is refused. On a
    // fresh server (no library loaded yet) as on one that has it.
    let server = RedisServer::start(&[]);
    let p = Prefix::on(&server.url());
    let url = user_on(&server, &p, "no-wait", COMMANDS);
    let q = connect(&p, &url).await.unwrap();
    for n in ["first", "second"] {
        let id = JobId::new(n).unwrap();
        let err = q
            .enqueue(Greet { name: n.into() })
            .id(id.clone())
            .wait_for_replicas(1, Duration::from_millis(100))
            .await
            .unwrap_err();
        match &err {
            Error::NoPermission { missing, .. } => {
                assert_eq!(*missing, AclMissing::Command("wait".into()), "{n}")
            }
            other => panic!("{n}: {other:?}"),
        }
        assert_eq!(q.status(&id).await.unwrap().state, JobState::Queued, "{n}");
    }
    // The refusal was about `WAIT`, not about functions: the queue still calls its
    // scripts by FCALL and nothing ran by SHA. Three calls: one found no library (a
    // fresh server), then one run per enqueue.
    let mut admin = redis::Client::open(server.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let stats: String = redis::cmd("INFO")
        .arg("commandstats")
        .query(&mut admin)
        .unwrap();
    assert!(!stats.contains("cmdstat_evalsha"), "{stats}");
    let fcall = stats
        .lines()
        .find(|l| l.starts_with("cmdstat_fcall:"))
        .unwrap_or_else(|| panic!("{stats}"));
    assert!(fcall.starts_with("cmdstat_fcall:calls=3,"), "{fcall}");
    assert!(fcall.ends_with(",failed_calls=1"), "{fcall}");
}
