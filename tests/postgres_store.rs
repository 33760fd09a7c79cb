//! The PostgreSQL store against real PostgreSQL servers: the shared
//! contract, several idemgate replicas sharing one database, a restart
//! under load, a failover to a synchronous standby, the sweeper, TLS as
//! the URL's `sslmode` says, the batches (one at a time, another beside
//! one held up), and the replay cache (copies dropped by a purge through
//! any replica, and by a lost connection).

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use idemgate::server::Running;
use idemgate::store::postgres::{PostgresOptions, PostgresStore};
use support::durable::{every_clean_end_replays, load, replay_clean_ends};
use support::postgres_server::{schema, shared_postgres, store_toml, PostgresServer};
use support::tls::Pki;
use support::{config, duplicates_agree, TestClient, TestUpstream};

/// A store on its own schema, whose waiters re-check only once a minute:
/// only `NOTIFY` can wake them in time. The replay cache is on, as by
/// default in the config, so the contract holds with it.
async fn connect(url: &str, schema: &str) -> PostgresStore {
    let mut options = PostgresOptions::new(url, schema).unwrap();
    options.recheck = Duration::from_secs(60);
    options.replay_cache_bytes = 8 << 20;
    PostgresStore::connect(options).await.unwrap()
}

/// Contract cases share one server while they run, each on a schema of
/// its own.
async fn shared(case: &str) -> (Arc<PostgresServer>, PostgresStore) {
    let pg = shared_postgres();
    let store = connect(&pg.url(), &schema(case)).await;
    (pg, store)
}

support::contract::record_contract!(record_contract, shared);
support::contract::bucket_contract!(bucket_contract, shared);
support::dedup_contract::dedup_contract!(dedup_contract, shared);

async fn replicas(up: &TestUpstream, n: usize, toml: &str) -> Vec<(Running, TestClient)> {
    let mut out = Vec::new();
    for _ in 0..n {
        let r = Running::start(config(Some(&up.url()), toml)).await.unwrap();
        let c = TestClient::new(r.proxy_addr.unwrap());
        out.push((r, c));
    }
    out
}

/// Statements run since the last reset, all but the sweeper's, the
/// listener's, the schema check's and this count's own.
fn statements(pg: &PostgresServer) -> u64 {
    pg.psql(
        "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements \
         WHERE query !~ '(pg_stat_statements|gone AS|LISTEN|to_regclass|schema_version)'",
    )
    .unwrap()
    .trim()
    .parse()
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_share_one_postgres() {
    let pg = PostgresServer::start();
    let up = TestUpstream::start().await;
    let nodes = replicas(&up, 3, &store_toml(&pg.url(), "shared")).await;

    // 1,000 concurrent duplicates spread across the replicas: one call.
    let clients: Vec<TestClient> = nodes.iter().map(|(_, c)| c.clone()).collect();
    duplicates_agree(&clients, 1000, "shared").await;
    assert_eq!(up.calls(), 1);

    // Round trips per request, counted by the server: a new key is a begin
    // and a complete; a replay is a begin alone.
    pg.psql("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        .unwrap();
    pg.psql("SELECT pg_stat_statements_reset()").unwrap();
    let c = &clients[0];
    for i in 0..100 {
        assert_eq!(c.post("/v1/x", &format!("rt-{i}"), "{}").await.status, 201);
    }
    let new_keys = statements(&pg);
    for i in 0..100 {
        let again = c.post("/v1/x", &format!("rt-{i}"), "{}").await;
        assert_eq!(again.header("idempotent-replayed"), Some("true"));
    }
    let replays = statements(&pg) - new_keys;
    // The first replay kept a copy: the next ones need no statement.
    for i in 0..100 {
        let again = c.post("/v1/x", &format!("rt-{i}"), "{}").await;
        assert_eq!(again.header("idempotent-replayed"), Some("true"));
    }
    let cached = statements(&pg) - new_keys - replays;
    println!(
        "statements per request: new key {new_keys}/100, replay {replays}/100, \
         replay again {cached}/100"
    );
    assert_eq!(new_keys, 200, "a new key takes a begin and a complete");
    assert_eq!(replays, 100, "a first replay takes one begin");
    assert_eq!(cached, 0, "a replay served by the cache takes none");
    for (r, _) in nodes {
        r.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_under_load_gives_503s_then_recovers_losing_nothing() {
    let pg = PostgresServer::start();
    let up = TestUpstream::start().await;
    let r = Running::start(config(Some(&up.url()), &store_toml(&pg.url(), "restart")))
        .await
        .unwrap();
    let c = TestClient::new(r.proxy_addr.unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let loads = load(&c, &stop);
    tokio::time::sleep(Duration::from_millis(700)).await;
    let mut pg = tokio::task::spawn_blocking(move || {
        let mut pg = pg;
        pg.kill();
        pg
    })
    .await
    .unwrap();
    // While it is down: 503 with Retry-After, within the store timeout,
    // and the upstream is not called.
    let calls = up.calls();
    let started = Instant::now();
    let down = c.post("/v1/x", "during-outage", "{}").await;
    down.assert_problem(503, "store-unavailable");
    assert!(down.header("retry-after").is_some());
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert!(
        up.calls() <= calls + 16,
        "only requests already past their begin ran"
    );
    let pg = tokio::task::spawn_blocking(move || {
        pg.restart();
        pg
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut ended = Vec::new();
    for l in loads {
        ended.extend(l.await.unwrap());
    }
    // Recovered without restarting idemgate; no acknowledged record lost
    // (crash recovery replays the WAL every commit flushed).
    let tally = every_clean_end_replays(&c, &ended).await;
    assert!(tally.get("clean").copied().unwrap_or(0) > 100, "{tally:?}");
    assert!(tally.get("problem").copied().unwrap_or(0) > 0, "{tally:?}");
    println!("PostgreSQL SIGKILLed and restarted under load: {tally:?}");
    assert_eq!(c.post("/v1/x", "after", "{}").await.status, 201);
    r.stop().await;
    drop(pg);
}

/// What a failover did to the keys idemgate had answered.
#[derive(Debug)]
struct Failover {
    tally: std::collections::HashMap<&'static str, usize>,
    /// Clean-ended keys whose retry did not replay the response.
    lost: usize,
    /// Keys the upstream ran more than once.
    ran_twice: usize,
    /// From the SIGKILL of the primary, and from the end of the promotion,
    /// to the first new key answered 201.
    kill_to_success: Duration,
    promoted_to_success: Duration,
}

/// A primary with a standby (synchronous or not), idemgate on the
/// multi-host URL, sixteen clients of new keys; the primary SIGKILLed
/// 700 ms in and the standby promoted; then every clean-ended key retried.
async fn failover(sync: bool) -> Failover {
    let primary = PostgresServer::start();
    let standby = primary.standby(sync);
    let url = format!(
        "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/postgres?target_session_attrs=read-write",
        primary.port, standby.port
    );
    let up = TestUpstream::start().await;
    let r = Running::start(config(Some(&up.url()), &store_toml(&url, "failover")))
        .await
        .unwrap();
    let c = TestClient::new(r.proxy_addr.unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let loads = load(&c, &stop);
    tokio::time::sleep(Duration::from_millis(700)).await;
    let killed_at = Instant::now();
    let (primary, standby, promoted_at) = tokio::task::spawn_blocking(move || {
        let mut primary = primary;
        primary.kill();
        standby.promote();
        (primary, standby, Instant::now())
    })
    .await
    .unwrap();
    // A probe of new keys, every 10 ms, until one is answered 201.
    let mut n = 0;
    let first_success = loop {
        n += 1;
        let got = c.post("/v1/x", &format!("probe-{n}"), "{}").await;
        if got.status == 201 {
            break Instant::now();
        }
        assert!(
            killed_at.elapsed() < Duration::from_secs(30),
            "never recovered"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, Ordering::Relaxed);
    let mut ended = Vec::new();
    for l in loads {
        ended.extend(l.await.unwrap());
    }
    let replayed = replay_clean_ends(&c, &ended).await;
    let mut runs: std::collections::HashMap<String, usize> = Default::default();
    for s in up.seen() {
        if let Some(k) = s.headers.get("idempotency-key") {
            *runs.entry(k.to_str().unwrap().to_owned()).or_default() += 1;
        }
    }
    r.stop().await;
    drop((primary, standby));
    Failover {
        tally: replayed.tally,
        lost: replayed.missing.len(),
        ran_twice: runs.values().filter(|n| **n > 1).count(),
        kill_to_success: first_success - killed_at,
        promoted_to_success: first_success.saturating_duration_since(promoted_at),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_to_a_synchronous_standby_loses_no_acknowledged_record() {
    let f = failover(true).await;
    println!(
        "failover, synchronous standby: {:?}; first success {:?} after the kill, {:?} after the promotion",
        f.tally, f.kill_to_success, f.promoted_to_success
    );
    assert!(f.tally.get("clean").copied().unwrap_or(0) > 100, "{f:?}");
    assert_eq!(f.lost, 0, "{f:?}");
    assert_eq!(f.ran_twice, 0, "{f:?}");
}

/// With asynchronous replication a commit is acknowledged before the
/// standby has it: what the failover loses is reported, not asserted away.
/// What holds: every request ended, and a lost record is never served as
/// another response.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_to_an_asynchronous_standby_reports_what_it_lost() {
    let f = failover(false).await;
    println!(
        "failover, asynchronous standby: {:?}; {} acknowledged records lost, {} keys ran twice; \
         first success {:?} after the kill",
        f.tally, f.lost, f.ran_twice, f.kill_to_success
    );
    assert!(f.tally.get("clean").copied().unwrap_or(0) > 100, "{f:?}");
    assert!(f.lost <= f.tally["clean"]);
}

fn idemgate(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_idemgate"));
    cmd.args(args);
    for (k, _) in std::env::vars() {
        if k.starts_with("IDEMGATE_") {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env.iter().copied());
    cmd.output().unwrap()
}

/// A config file in a folder of its own, removed when dropped.
struct File(std::path::PathBuf);

impl File {
    fn new(text: &str) -> Self {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "idemgate-pg-config-{}-{}.toml",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&path, text).unwrap();
        File(path)
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for File {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn check_config_never_connects_nor_shows_the_password() {
    // Nothing listens on port 1: checking must not try.
    let f = File::new(
        "[store]\nbackend = \"postgres\"\nurl = \"postgres://app:s3cret@127.0.0.1:1/db\"\n",
    );
    let o = idemgate(&["check-config", "--config", f.path()], &[]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        out.contains("url = \"postgres://app:***@127.0.0.1:1/db\""),
        "{out}"
    );
    assert!(out.contains("schema = \"idemgate\""), "{out}");
    assert!(!out.contains("s3cret"));

    // From the environment: only the variable's name is shown.
    let f = File::new("[store]\nbackend = \"postgres\"\nurl_env = \"APP_DATABASE_URL\"\n");
    let env = [("APP_DATABASE_URL", "postgres://app:s3cret@db/x")];
    let o = idemgate(&["check-config", "--config", f.path()], &env);
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.contains("url_env = \"APP_DATABASE_URL\""), "{out}");
    assert!(!out.contains("s3cret"));
}

#[test]
fn bad_postgres_keys_are_exit_2_naming_each() {
    let f = File::new(
        "[store]\nbackend = \"postgres\"\nurl_env = \"IDEMGATE_TEST_UNSET\"\n\
         schema = \"bad-name\"\npool_size = 0\n",
    );
    let o = idemgate(&["check-config", "--config", f.path()], &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    for path in ["store.url_env", "store.schema", "store.pool_size"] {
        assert!(err.contains(path), "{path} not named: {err}");
    }
    let f = File::new(
        "[store]\nbackend = \"postgres\"\nurl = \"mysql://x:s3cret@h/db\"\nurl_file = \"/nope\"\n",
    );
    let o = idemgate(&["check-config", "--config", f.path()], &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("store.url"), "{err}");
    assert!(err.contains("one of url, url_env and url_file"), "{err}");
    assert!(!err.contains("s3cret"), "{err}");
    let f = File::new("[store]\nbackend = \"postgres\"\n");
    let o = idemgate(&["check-config", "--config", f.path()], &[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("needs a URL"));
}

/// `idemgate migrate` creates the schema as a role that may; the sidecar
/// then runs as one that may not create anything, only use what is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_ahead_lets_a_least_privilege_role_run() {
    let pg = PostgresServer::start();
    let f = File::new(&store_toml(&pg.url(), "app"));
    let o = idemgate(&["migrate", "--config", f.path()], &[]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        "schema app created at version 4"
    );
    let o = idemgate(&["migrate", "--config", f.path()], &[]);
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        "schema app is at version 4"
    );
    // The grants the README gives a role that runs the sidecar.
    for sql in [
        "CREATE ROLE app LOGIN",
        "GRANT USAGE ON SCHEMA app TO app",
        "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA app TO app",
        "GRANT USAGE ON ALL SEQUENCES IN SCHEMA app TO app",
    ] {
        pg.psql(sql).unwrap();
    }
    let app_url = format!("postgres://app@127.0.0.1:{}/postgres", pg.port);
    // The role cannot create: a schema not made ahead is an error at start.
    let err = Running::start(config(None, &store_toml(&app_url, "other")))
        .await
        .err()
        .expect("started without its schema");
    assert!(err.to_string().contains("permission denied"), "{err}");
    let up = TestUpstream::start().await;
    let r = Running::start(config(Some(&up.url()), &store_toml(&app_url, "app")))
        .await
        .unwrap();
    let c = TestClient::new(r.proxy_addr.unwrap());
    assert_eq!(c.post("/v1/x", "k", "{}").await.status, 201);
    let again = c.post("/v1/x", "k", "{}").await;
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(up.calls(), 1);
    r.stop().await;
}

/// A schema made by version 1 (its SQL kept as a fixture) is brought to
/// the current version in place by `idemgate migrate`: its records are
/// kept, its batch functions replaced, the one-key completion it no longer
/// calls dropped, the combined batch function added.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_1_schema_is_migrated_keeping_its_records() {
    let pg = PostgresServer::start();
    let up = TestUpstream::start().await;
    let toml = store_toml(&pg.url(), "old");
    let r = Running::start(config(Some(&up.url()), &toml))
        .await
        .unwrap();
    let c = TestClient::new(r.proxy_addr.unwrap());
    assert_eq!(c.post("/v1/x", "before", "{}").await.status, 201);
    r.stop().await;
    // Back to version 1: its functions, its version row.
    let v1 = include_str!("fixtures/postgres_schema_v1.sql")
        .replace("{schema}", "\"old\"")
        .replace("{channel}", "old_done")
        .replace("{replays}", "old_replays");
    pg.psql(&v1).expect("the version 1 schema");
    pg.psql("UPDATE old.schema_version SET version = 1")
        .unwrap();
    let one_key = "SELECT count(*) FROM pg_proc \
                   WHERE proname = 'complete_lease' AND pronamespace = 'old'::regnamespace";
    assert_eq!(pg.psql(one_key).unwrap().trim(), "1");

    let f = File::new(&toml);
    let o = idemgate(&["migrate", "--config", f.path()], &[]);
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        "schema old migrated from version 1 to 4",
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(pg.psql(one_key).unwrap().trim(), "0");
    let step = "SELECT count(*) FROM pg_proc \
                WHERE proname = 'step_many' AND pronamespace = 'old'::regnamespace";
    assert_eq!(pg.psql(step).unwrap().trim(), "1");
    assert_eq!(
        pg.psql("SELECT max(version) FROM old.schema_version")
            .unwrap()
            .trim(),
        "4"
    );
    let r = Running::start(config(Some(&up.url()), &toml))
        .await
        .unwrap();
    let c = TestClient::new(r.proxy_addr.unwrap());
    let again = c.post("/v1/x", "before", "{}").await;
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(c.post("/v1/x", "after", "{}").await.status, 201);
    let again = c.post("/v1/x", "after", "{}").await;
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(up.calls(), 2);
    r.stop().await;
}

/// One `begin_many` holding every case a batch can meet: new keys (taken
/// by its one insert), a key given twice (the second finds the first's
/// lease), a completed key, an expired one (a new lease, a higher fence)
/// and a key in flight elsewhere; then one `complete_many` completing the
/// batch's leases and refusing a token that is not the lease's, one
/// holding a key twice (a lapsed holder's token and the current one), and
/// one `step_many` carrying a completion and a begin of the same key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_batch_answers_each_of_its_keys_on_its_own() {
    let pg = PostgresServer::start();
    let store = connect(&pg.url(), "batch").await;
    drop(store);
    let q = |sql: &str| {
        pg.psql(sql)
            .unwrap_or_else(|| panic!("{sql}"))
            .trim()
            .to_owned()
    };
    // Rows in place: 'done' completed, 'old' expired, 'busy' in flight.
    q("INSERT INTO batch.records (key, state, token, fence, fp, lease_until_ms, record, expires_ms) VALUES \
       ('\\x646f6e65', 'c', NULL, nextval('batch.fences'), NULL, NULL, '\\x01', batch.now_ms() + 60000), \
       ('\\x6f6c64', 'c', NULL, nextval('batch.fences'), NULL, NULL, '\\x02', batch.now_ms() - 1), \
       ('\\x62757379', 'i', 'other', nextval('batch.fences'), '\\x03', batch.now_ms() + 60000, NULL, batch.now_ms() + 60000)");
    let old_fence: i64 = q("SELECT fence FROM batch.records WHERE key = '\\x6f6c64'")
        .parse()
        .unwrap();
    // Positions: 1 'b', 2 'a', 3 'done', 4 'old', 5 'a' again, 6 'busy'.
    let got = q(
        "SELECT string_agg(i || ':' || kind::text, ' ' ORDER BY i) FROM batch.begin_many(\
         ARRAY['\\x62', '\\x61', '\\x646f6e65', '\\x6f6c64', '\\x61', '\\x62757379']::bytea[], \
         ARRAY['t1', 't2', 't3', 't4', 't5', 't6'], \
         array_fill('\\x09'::bytea, ARRAY[6]), array_fill(30000::bigint, ARRAY[6]), \
         array_fill(60000::bigint, ARRAY[6]), array_fill(NULL::bigint, ARRAY[6]), \
         array_fill(NULL::bigint, ARRAY[6]))",
    );
    assert_eq!(got, "1:a 2:a 3:c 4:a 5:i 6:i");
    // The first of the key given twice holds the lease.
    assert_eq!(
        q("SELECT token FROM batch.records WHERE key = '\\x61'"),
        "t2"
    );
    let new_fence: i64 = q("SELECT fence FROM batch.records WHERE key = '\\x6f6c64'")
        .parse()
        .unwrap();
    assert!(new_fence > old_fence, "{new_fence} after {old_fence}");

    // A batch of keys that have rows draws no fence: it writes nothing,
    // so it waits for no WAL flush.
    let fences = "SELECT last_value FROM batch.fences";
    let before = q(fences);
    let got = q(
        "SELECT string_agg(i || ':' || kind::text, ' ' ORDER BY i) FROM batch.begin_many(\
         ARRAY['\\x646f6e65', '\\x62757379']::bytea[], ARRAY['t7', 't8'], \
         array_fill('\\x09'::bytea, ARRAY[2]), array_fill(30000::bigint, ARRAY[2]), \
         array_fill(60000::bigint, ARRAY[2]), array_fill(NULL::bigint, ARRAY[2]), \
         array_fill(NULL::bigint, ARRAY[2]))",
    );
    assert_eq!(got, "1:c 2:i");
    assert_eq!(q(fences), before);

    let done = q("SELECT string_agg(i || ':' || done, ' ' ORDER BY i) FROM batch.complete_many(\
         ARRAY['\\x61', '\\x62', '\\x62757379', '\\x6f6c64']::bytea[], ARRAY['t2', 't1', 't6', 't4'], \
         array_fill('\\x0a'::bytea, ARRAY[4]), array_fill(60000::bigint, ARRAY[4]))");
    assert_eq!(done, "1:true 2:true 3:false 4:true");
    assert_eq!(
        q("SELECT string_agg(encode(key, 'escape') || '=' || state::text, ' ' ORDER BY key) FROM batch.records"),
        "a=c b=c busy=i done=c old=c"
    );

    // A key given twice, by a holder whose lease was taken over (first)
    // and by the current holder: only the current one stores its record.
    q("INSERT INTO batch.records (key, state, token, fence, fp, lease_until_ms, expires_ms) VALUES \
       ('\\x7477696365', 'i', 'now', nextval('batch.fences'), '\\x09', \
        batch.now_ms() + 60000, batch.now_ms() + 60000)");
    let done = q(
        "SELECT string_agg(i || ':' || done, ' ' ORDER BY i) FROM batch.complete_many(\
         ARRAY['\\x7477696365', '\\x7477696365']::bytea[], ARRAY['before', 'now'], \
         ARRAY['\\x0b', '\\x0c']::bytea[], array_fill(60000::bigint, ARRAY[2]))",
    );
    assert_eq!(done, "1:false 2:true");
    assert_eq!(
        q("SELECT encode(record, 'hex') FROM batch.records WHERE key = '\\x7477696365'"),
        "0c"
    );

    // step_many: completions first (their rows minus their positions),
    // then begins: a begin of the key the batch completes finds it
    // completed, a new key is taken.
    q("INSERT INTO batch.records (key, state, token, fence, fp, lease_until_ms, expires_ms) VALUES \
       ('\\x73746570', 'i', 'sx', nextval('batch.fences'), '\\x09', \
        batch.now_ms() + 60000, batch.now_ms() + 60000)");
    let got = q(
        "SELECT string_agg(i || ':' || coalesce(kind::text, done::text), ' ' ORDER BY i) \
         FROM batch.step_many(\
         ARRAY['\\x73746570', '\\x6e6577']::bytea[], ARRAY['s1', 's2'], \
         array_fill('\\x09'::bytea, ARRAY[2]), array_fill(30000::bigint, ARRAY[2]), \
         array_fill(60000::bigint, ARRAY[2]), array_fill(NULL::bigint, ARRAY[2]), \
         array_fill(NULL::bigint, ARRAY[2]), \
         ARRAY['\\x73746570']::bytea[], ARRAY['sx'], ARRAY['\\x0d']::bytea[], \
         ARRAY[60000::bigint])",
    );
    assert_eq!(got, "-1:true 1:c 2:a");
}

/// Many callers at once through one store: every caller gets its own
/// answer from the batches it rode in (its lease, its completion, its own
/// record on the replay).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_batches_answer_each_caller_its_own() {
    use idemgate::idempotency::state::Begin;
    use idemgate::store::RecordStore;
    let pg = PostgresServer::start();
    let store = Arc::new(connect(&pg.url(), "mixed").await);
    for round in 0..3 {
        let callers: Vec<_> = (0..200)
            .map(|i| {
                let store = store.clone();
                tokio::spawn(async move {
                    let name = format!("mixed-{round}-{i}");
                    let k = cache::key(&name);
                    let Begin::Acquired(lease) = cache::begin(&store, &k).await else {
                        panic!("{name} not acquired")
                    };
                    let record = Arc::new(cache::record(&name));
                    let ttl = Duration::from_secs(600);
                    assert!(
                        store.complete(&k, &lease, record, ttl).await.unwrap(),
                        "{name} not stored"
                    );
                    match cache::begin(&store, &k).await {
                        Begin::Completed(rec) => {
                            assert_eq!(&rec.response.body[..], name.as_bytes(), "{name}")
                        }
                        _ => panic!("{name} not completed"),
                    }
                })
            })
            .collect();
        for caller in callers {
            caller.await.unwrap();
        }
    }
}

/// Locks the row of `key` in `schema` (an expired record, which a begin
/// must lock to take over) from a transaction of its own, held until the
/// returned client is dropped.
async fn hold_row(pg: &PostgresServer, schema: &str, key: &str) -> tokio_postgres::Client {
    pg.psql(&format!(
        "INSERT INTO {schema}.records (key, state, token, fence, fp, lease_until_ms, record, \
         expires_ms) VALUES ('\\x{key}', 'c', NULL, nextval('{schema}.fences'), NULL, NULL, \
         '\\x01', {schema}.now_ms() - 1)"
    ))
    .expect("an expired row");
    let (client, connection) = tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
        .batch_execute(&format!(
            "BEGIN; SELECT FROM {schema}.records WHERE key = '\\x{key}' FOR UPDATE"
        ))
        .await
        .unwrap();
    client
}

/// A store for the tests that hold a batch up: its calls wait out the
/// test rather than the store's bound (1 s), and with a pool of
/// `pool_size` (2 allows no batch beside the held one; 16, the default,
/// allows one).
async fn held_up(pg: &PostgresServer, schema: &str, pool_size: usize) -> Arc<PostgresStore> {
    let mut options = PostgresOptions::new(&pg.url(), schema).unwrap();
    options.pool_size = pool_size;
    options.replay_cache_bytes = 0;
    options.timeout = Duration::from_secs(30);
    Arc::new(PostgresStore::connect(options).await.unwrap())
}

/// One batch at a time: calls that arrive while it runs wait for it and
/// then go out together, begins and completions in one call. Held here
/// on a row lock, with a pool of two (which allows no batch beside it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_gather_behind_the_running_batch_and_go_as_one() {
    use idemgate::idempotency::state::Begin;
    use idemgate::store::RecordStore;
    let pg = PostgresServer::start();
    pg.psql("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        .unwrap();
    let store = held_up(&pg, "gather", 2).await;
    let (first, second) = (cache::key("first"), cache::key("second"));
    let Begin::Acquired(lease) = cache::begin(&store, &first).await else {
        panic!("first not acquired")
    };
    let held = cache::key("held");
    let lock = hold_row(&pg, "gather", &held.to_hex()).await;
    pg.psql("SELECT pg_stat_statements_reset()").unwrap();
    let blocked = {
        let store = store.clone();
        tokio::spawn(async move { cache::begin(&store, &held).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let completed = {
        let store = store.clone();
        let record = Arc::new(cache::record("first"));
        tokio::spawn(async move {
            store
                .complete(&first, &lease, record, Duration::from_secs(600))
                .await
        })
    };
    let begun = {
        let store = store.clone();
        tokio::spawn(async move { cache::begin(&store, &second).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!blocked.is_finished() && !completed.is_finished() && !begun.is_finished());
    drop(lock);
    assert!(matches!(blocked.await.unwrap(), Begin::Acquired(_)));
    assert!(completed.await.unwrap().unwrap());
    assert!(matches!(begun.await.unwrap(), Begin::Acquired(_)));
    let calls = pg
        .psql("SELECT sum(calls) FROM pg_stat_statements WHERE query LIKE '%step_many%'")
        .unwrap();
    assert_eq!(calls.trim(), "2", "the held batch, then one for both calls");
    assert!(cache::is_completed(&store, &cache::key("first")).await);
}

/// A batch held up (on a row lock here) holds up the calls behind it only
/// for the batcher's patience (5 ms): then they go out in a batch beside
/// it, long before the held one ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_batch_holds_up_the_others_only_briefly() {
    use idemgate::idempotency::state::Begin;
    let pg = PostgresServer::start();
    let store = held_up(&pg, "beside", 16).await;
    let held = cache::key("held");
    let lock = hold_row(&pg, "beside", &held.to_hex()).await;
    let blocked = {
        let store = store.clone();
        tokio::spawn(async move { cache::begin(&store, &held).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    for i in 0..3 {
        let k = cache::key(&format!("other-{i}"));
        let begun = tokio::time::timeout(Duration::from_secs(5), cache::begin(&store, &k)).await;
        assert!(matches!(begun, Ok(Begin::Acquired(_))), "other-{i} waited");
    }
    assert!(!blocked.is_finished());
    drop(lock);
    assert!(matches!(blocked.await.unwrap(), Begin::Acquired(_)));
}

/// The sweeper deletes expired rows from every table, more than one
/// bounded batch of them in a pass, and leaves live rows alone (a read
/// already treats an expired row as absent; the sweep gives the space
/// back). Its passes run every 5 s from connecting: all of it by the
/// first, so a pass that stopped after one batch would fail here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweeper_deletes_expired_rows_and_keeps_live_ones() {
    let pg = shared_postgres();
    let s = schema("sweeper");
    let store = connect(&pg.url(), &s).await;
    let connected = Instant::now();
    let live = cache::key("live");
    cache::complete(&store, &live, Duration::from_secs(600)).await;
    // Expired rows as the functions leave them, 2,500 records (three of
    // the sweeper's batches) and 1,200 of each other kind, with one live
    // row of each kind beside them.
    let key = "decode(lpad(to_hex(g), 8, '0'), 'hex')";
    let seeded = pg.psql(&format!(
        "INSERT INTO {s}.records (key, state, fence, expires_ms) \
           SELECT {key}, 'c', g, {s}.now_ms() - 1 FROM generate_series(1, 2500) g; \
         INSERT INTO {s}.records (key, state, fence, expires_ms) \
           VALUES ('\\xff', 'c', 0, {s}.now_ms() + 600000); \
         INSERT INTO {s}.dedup (scope, key, state, expires_ms) \
           SELECT 'q', {key}, 'c', {s}.now_ms() - 1 FROM generate_series(1, 1201) g; \
         UPDATE {s}.dedup SET expires_ms = {s}.now_ms() + 600000 WHERE key = '\\x00000001'; \
         INSERT INTO {s}.buckets (scope, tokens, at_ms, expires_ms) \
           SELECT {key}, 1, 0, {s}.now_ms() - 1 FROM generate_series(1, 1201) g; \
         UPDATE {s}.buckets SET expires_ms = {s}.now_ms() + 600000 WHERE scope = '\\x00000001'"
    ));
    assert!(seeded.is_some(), "the rows could not be seeded");
    let counts = || -> Vec<u64> {
        pg.psql(&format!(
            "SELECT (SELECT count(*) FROM {s}.records) || ' ' || \
             (SELECT count(*) FROM {s}.dedup) || ' ' || (SELECT count(*) FROM {s}.buckets)"
        ))
        .unwrap()
        .split_whitespace()
        .map(|n| n.parse().unwrap())
        .collect()
    };
    assert_eq!(counts(), [2502, 1201, 1201], "the seeded rows");
    // Left once every expired row is gone: the completed record and the
    // live row of each kind.
    let live_rows = [2, 1, 1];
    loop {
        let now = counts();
        assert!(
            now.iter().zip(live_rows).all(|(n, l)| *n >= l),
            "the sweeper deleted live rows: {now:?} rows left"
        );
        if now == live_rows {
            break;
        }
        // The first pass (5 s), with 4 s to spare, before the second.
        assert!(
            connected.elapsed() < Duration::from_secs(9),
            "expired rows outlived the sweeper's first pass: {now:?} rows left"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(cache::is_completed(&store, &live).await);
    let kept = pg.psql(&format!(
        "SELECT count(*) FROM {s}.records WHERE key = '\\xff' OR state = 'c' AND record IS NOT NULL"
    ));
    assert_eq!(kept.unwrap().trim(), "2", "the live rows are the ones kept");
}

/// TLS to PostgreSQL through rustls, the server checked as the URL's
/// `sslmode` says in libpq's spellings, against a server whose
/// certificate, from a private CA, names `localhost` only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_checks_the_server_as_the_url_says() {
    let pki = Pki::new("postgres");
    let (cert, key) = pki.leaf(&["localhost"]);
    let pg = PostgresServer::start_tls(&cert, &key);
    let up = TestUpstream::start().await;
    let port = pg
        .url()
        .rsplit(':')
        .next()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_owned();
    let ca = pki.ca_file();
    let toml = |host: &str, query: &str, with_ca: bool| {
        let mut t = store_toml(
            &format!("postgres://postgres@{host}:{port}/postgres{query}"),
            &schema("tls"),
        );
        if with_ca {
            t.push_str(&format!("ca_file = \"{}\"\n", ca.display()));
        }
        t
    };
    // Whether every connection idemgate holds is on TLS, and how many.
    let encrypted = || {
        pg.psql(
            "SELECT count(*) || ' ' || bool_and(s.ssl) FROM pg_stat_ssl s \
             JOIN pg_stat_activity a USING (pid) \
             WHERE a.backend_type = 'client backend' AND a.pid <> pg_backend_pid()",
        )
        .unwrap()
        .trim()
        .to_owned()
    };
    let refused = |host: &str, query: &str, with_ca: bool| {
        let config = config(Some(&up.url()), &toml(host, query, with_ca));
        let what = format!("{host}{query} (CA given: {with_ca})");
        async move {
            match Running::start(config).await {
                Ok(_) => panic!("{what} started"),
                Err(e) => e.to_string(),
            }
        }
    };
    let serves = |host: &str, query: &str, with_ca: bool, key: &str| {
        let config = config(Some(&up.url()), &toml(host, query, with_ca));
        let key = key.to_owned();
        let what = format!("{host}{query} (CA given: {with_ca})");
        async move {
            let r = Running::start(config)
                .await
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            let c = TestClient::new(r.proxy_addr.unwrap());
            let first = c.post("/v1/x", &key, "{}").await;
            assert_eq!(first.status, 201, "{what}");
            let again = c.post("/v1/x", &key, "{}").await;
            assert_eq!(
                (again.status, again.body),
                (first.status, first.body),
                "{what}"
            );
            r
        }
    };

    // The chain and the name: both hold.
    let r = serves("localhost", "?sslmode=verify-full", true, "full").await;
    let held = encrypted();
    assert!(
        held.ends_with(" true") && !held.starts_with("0 "),
        "not all on TLS: {held}"
    );
    drop(r);
    let r = serves("localhost", "?sslmode=require", true, "require").await;
    assert!(encrypted().ends_with(" true"), "require: not all on TLS");
    drop(r);

    // By an address the certificate does not name: refused unless the URL
    // says verify-ca, which still checks the chain.
    let e = refused("127.0.0.1", "?sslmode=verify-full", true).await;
    assert!(
        e.contains("invalid peer certificate") && e.contains("sslmode=verify-ca"),
        "{e}"
    );
    drop(serves("127.0.0.1", "?sslmode=verify-ca", true, "ca").await);
    let e = refused("127.0.0.1", "?sslmode=verify-ca", false).await;
    assert!(e.contains("invalid peer certificate"), "{e}");

    // The CA not given: TLS offered by default, and refused with what to do.
    let e = refused("localhost", "", false).await;
    assert!(
        e.contains("invalid peer certificate") && e.contains("store.ca_file"),
        "{e}"
    );
    // Without TLS, as the URL asks.
    let r = serves("localhost", "?sslmode=disable", false, "plain").await;
    assert!(encrypted().ends_with(" false"), "sslmode=disable used TLS");
    drop(r);
}

/// `pool_size` bounds the connections a replica holds, plus the one that
/// listens: 300 dedup claims at once (each a call of its own, not
/// batched) through a pool of 3 queue for its connections, and every one
/// is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_size_bounds_the_connections_under_load() {
    let pg = Arc::new(PostgresServer::start());
    let up = TestUpstream::start().await;
    let mut toml = store_toml(&pg.url(), "pool");
    toml.push_str("pool_size = 3\n");
    let toml = toml.replace("timeout = \"1s\"", "timeout = \"10s\"");
    let r = Running::start(config(Some(&up.url()), &toml))
        .await
        .unwrap();
    let admin = TestClient::new(r.admin_addr);
    let held = {
        let pg = pg.clone();
        move || -> u64 {
            pg.psql(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()",
            )
            .unwrap()
            .trim()
            .parse()
            .unwrap()
        }
    };
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (done, held) = (done.clone(), held.clone());
        std::thread::spawn(move || {
            let mut most = 0;
            while !done.load(Ordering::Relaxed) {
                most = most.max(held());
                std::thread::sleep(Duration::from_millis(10));
            }
            most
        })
    };
    let claims: Vec<_> = (0..300)
        .map(|i| {
            let admin = admin.clone();
            tokio::spawn(async move {
                let body = format!("{{\"key\":\"job-{i}\"}}");
                admin
                    .send("POST", "/v1/dedup/pool/claim", &[], &body)
                    .await
                    .status
            })
        })
        .collect();
    for c in claims {
        assert_eq!(c.await.unwrap(), 201, "a new key's claim");
    }
    done.store(true, Ordering::Relaxed);
    let most = sampler.join().unwrap();
    assert!(most >= 1, "no connection was seen");
    assert!(most <= 4, "{most} connections held with pool_size = 3");
    assert!(held() <= 4);
    r.stop().await;
}

// The replay cache: two stores on one schema stand for two replicas.

/// How soon a purge through one replica reaches another's cache (one
/// notification on loopback; generous for a loaded machine).
const INVALIDATION_BOUND: Duration = Duration::from_secs(1);

mod cache {
    use super::*;
    use bytes::Bytes;
    use http::{HeaderMap, StatusCode};
    use idemgate::idempotency::key::{Fingerprint, RecordKey};
    use idemgate::idempotency::record::{CompletedRecord, StoredResponse};
    use idemgate::idempotency::state::{Begin, BeginOptions};
    use idemgate::store::RecordStore;

    pub fn key(name: &str) -> RecordKey {
        RecordKey::derive(&HeaderMap::new(), &[], &http::Method::POST, "/v1/x", name)
    }

    const FP: Fingerprint = Fingerprint([3; 32]);

    fn opts() -> BeginOptions {
        BeginOptions {
            lease_ttl: Duration::from_secs(30),
            hold_lapsed: None,
            reconcile_every: None,
        }
    }

    /// Completes `k` through `store` with a record that lives `ttl`.
    pub async fn complete(store: &PostgresStore, k: &RecordKey, ttl: Duration) {
        let Begin::Acquired(lease) = store.begin(k, &FP, opts()).await.unwrap() else {
            panic!("not acquired")
        };
        let record = record("{\"ok\":true}");
        assert!(store
            .complete(k, &lease, Arc::new(record), ttl)
            .await
            .unwrap());
    }

    /// A record whose body is `body`.
    pub fn record(body: &str) -> CompletedRecord {
        CompletedRecord {
            origin: None,
            fingerprint: FP,
            created_unix_ms: 1,
            response: StoredResponse {
                status: StatusCode::CREATED,
                headers: HeaderMap::new(),
                body: Bytes::from(body.to_owned()),
                body_omitted: false,
                trailers: HeaderMap::new(),
            },
        }
    }

    pub async fn begin(store: &PostgresStore, k: &RecordKey) -> Begin {
        store.begin(k, &FP, opts()).await.unwrap()
    }

    pub async fn is_completed(store: &PostgresStore, k: &RecordKey) -> bool {
        matches!(begin(store, k).await, Begin::Completed(_))
    }

    /// Begin statements the server has run (the batch functions that
    /// carry begins: alone, or with completions).
    pub fn begins(pg: &PostgresServer) -> u64 {
        pg.psql(
            "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements \
             WHERE query ~ '(begin|step)_many'",
        )
        .unwrap()
        .trim()
        .parse()
        .unwrap()
    }

    /// Waits until `store` holds no copy, failing after `bound`.
    pub async fn emptied(store: &PostgresStore, bound: Duration, why: &str) {
        let started = Instant::now();
        while store.replay_cache_bytes() > 0 {
            assert!(started.elapsed() < bound, "{why}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Waits until the listener is back (a new copy is kept again). Calls
    /// may fail meanwhile: pooled connections to a restarted server break
    /// one by one.
    pub async fn copies_resume(store: &PostgresStore, k: &RecordKey) {
        let started = Instant::now();
        loop {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "the cache never came back"
            );
            let _ = store.purge(k).await;
            if let Ok(Begin::Acquired(lease)) = store.begin(k, &FP, opts()).await {
                let record = CompletedRecord {
                    origin: None,
                    fingerprint: FP,
                    created_unix_ms: 1,
                    response: StoredResponse {
                        status: StatusCode::CREATED,
                        headers: HeaderMap::new(),
                        body: Bytes::from_static(b"{}"),
                        body_omitted: false,
                        trailers: HeaderMap::new(),
                    },
                };
                let ttl = Duration::from_secs(600);
                if let Ok(true) = store.complete(k, &lease, Arc::new(record), ttl).await {
                    let replayed = store.begin(k, &FP, opts()).await;
                    if matches!(replayed, Ok(Begin::Completed(_))) && store.replay_cache_bytes() > 0
                    {
                        return;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_through_one_replica_reaches_the_others_cache() {
    use idemgate::idempotency::state::Begin;
    use idemgate::store::RecordStore;
    let pg = PostgresServer::start();
    pg.psql("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        .unwrap();
    let (a, b) = (
        connect(&pg.url(), "rc").await,
        connect(&pg.url(), "rc").await,
    );
    let k = cache::key("purged");
    cache::complete(&a, &k, Duration::from_secs(600)).await;
    // A completing it kept no copy; B reads it once, then from its cache.
    assert_eq!(a.replay_cache_bytes(), 0);
    assert!(cache::is_completed(&b, &k).await);
    let begins = cache::begins(&pg);
    for _ in 0..10 {
        assert!(cache::is_completed(&b, &k).await);
    }
    assert_eq!(cache::begins(&pg), begins, "replays went to PostgreSQL");
    assert!(b.replay_cache_bytes() > 0);
    // Purged through A: B's copy goes within the bound.
    assert!(a.purge(&k).await.unwrap());
    cache::emptied(
        &b,
        INVALIDATION_BOUND,
        "B's copy outlived the purge by the bound",
    )
    .await;
    assert!(matches!(cache::begin(&b, &k).await, Begin::Acquired(_)));
    // Purged through B itself: its own next begin sees it at once, not
    // only once the notification comes back (tried on many keys, as that
    // is a race on loopback).
    for i in 0..50 {
        let k2 = cache::key(&format!("purged-here-{i}"));
        cache::complete(&a, &k2, Duration::from_secs(600)).await;
        assert!(cache::is_completed(&b, &k2).await);
        assert!(b.purge(&k2).await.unwrap());
        assert!(
            matches!(cache::begin(&b, &k2).await, Begin::Acquired(_)),
            "B replayed a record it had just purged"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_listener_empties_the_cache_and_copies_resume_after() {
    use idemgate::store::RecordStore;
    let pg = PostgresServer::start();
    let b = connect(&pg.url(), "rc").await;
    let k = cache::key("lost");
    cache::complete(&b, &k, Duration::from_secs(600)).await;
    assert!(cache::is_completed(&b, &k).await);
    assert!(b.replay_cache_bytes() > 0);
    // The listening connection is cut: purges could go unheard, so the
    // copies go, and the record deleted behind idemgate's back is seen.
    pg.psql(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE query LIKE 'LISTEN%'",
    )
    .unwrap();
    cache::emptied(&b, INVALIDATION_BOUND, "the cache outlived its listener").await;
    pg.psql("DELETE FROM rc.records").unwrap();
    assert!(!cache::is_completed(&b, &k).await);
    b.purge(&k).await.unwrap();
    // Listening again: copies are kept again.
    cache::copies_resume(&b, &cache::key("after")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_restart_empties_the_cache() {
    let mut pg = PostgresServer::start();
    let b = connect(&pg.url(), "rc").await;
    let k = cache::key("restart");
    cache::complete(&b, &k, Duration::from_secs(600)).await;
    assert!(cache::is_completed(&b, &k).await);
    assert!(b.replay_cache_bytes() > 0);
    let pg = tokio::task::spawn_blocking(move || {
        pg.restart();
        pg
    })
    .await
    .unwrap();
    cache::emptied(&b, Duration::from_secs(5), "the cache outlived a restart").await;
    cache::copies_resume(&b, &cache::key("after-restart")).await;
    drop(pg);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_ends_with_its_record() {
    use idemgate::idempotency::state::Begin;
    let pg = shared_postgres();
    let b = connect(&pg.url(), &schema("copy-ttl")).await;
    let k = cache::key("ttl");
    let completed = Instant::now();
    cache::complete(&b, &k, Duration::from_millis(3000)).await;
    // Copies are kept once the listener hears purges (just after connect).
    while b.replay_cache_bytes() == 0 {
        assert!(cache::is_completed(&b, &k).await);
        assert!(
            completed.elapsed() < Duration::from_secs(2),
            "no copy was kept"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep_until((completed + Duration::from_millis(3100)).into()).await;
    assert!(matches!(cache::begin(&b, &k).await, Begin::Acquired(_)));
}
