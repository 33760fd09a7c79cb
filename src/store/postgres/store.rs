//! [`PostgresStore`]: a bounded pool of connections (deadpool-postgres over
//! tokio-postgres), the statements the contract's parts run (each a call of
//! one function of `schema.sql`, prepared once per connection), every call
//! bounded by `store.timeout`, and a sweeper that deletes expired rows in
//! small batches on their expiry index, so a table of millions of rows
//! never takes a long lock. Replayed records are kept in the process
//! (`store/replays.rs`), their purges heard by the listener.
//!
//! A multi-host URL (`postgres://h1,h2/db?target_session_attrs=read-write`)
//! is followed through a failover: a connection to the old primary is
//! closed and dropped from the pool, and the next one goes to whichever
//! host now takes writes.

use std::sync::{Arc, Weak};
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, QueueMode, RecyclingMethod, Runtime};
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;
use tokio_postgres_rustls::MakeRustlsConnect;

use super::batch::{self, Batcher, Step, Stepped};
use super::db::{col, unavailable, Db};
use super::listen::{self, Waiters};
use super::schema::{self, quoted};
use super::tls::{self, Verify};
use crate::store::error::StoreError;
use crate::store::replays::ReplayCache;
use crate::store::sealing::Sealing;

/// The longest a waiter goes without re-checking the record itself.
pub const RECHECK: Duration = Duration::from_millis(500);
/// How often the sweeper runs, and how many rows one batch deletes.
const SWEEP_EVERY: Duration = Duration::from_secs(5);
const SWEEP_BATCH: i64 = 1000;
/// The most calls (begins and completions) one batch carries.
const MAX_BATCH: usize = 128;

/// Batches sent at once: one, and a second beside it once a call has
/// waited `BATCH_PATIENCE` for the first.
const BATCHES_IN_FLIGHT: usize = 2;
const BATCH_PATIENCE: Duration = Duration::from_millis(5);

fn closing() -> StoreError {
    StoreError::Unavailable("the store is closing".into())
}

/// How to reach PostgreSQL and how to behave there.
#[derive(Clone)]
pub struct PostgresOptions {
    /// Parsed from the URL (multi-host, `target_session_attrs`, `sslmode`).
    pub config: tokio_postgres::Config,
    /// The schema every object lives in (a checked identifier).
    pub schema: String,
    pub pool_size: usize,
    /// Upper bound on any one call.
    pub timeout: Duration,
    /// The longest a waiter goes without re-checking ([`RECHECK`]).
    pub recheck: Duration,
    pub sealing: Sealing,
    /// What TLS checks of the server's certificate, from the URL's
    /// `sslmode` (`verify-ca`: not the host name).
    pub verify: Verify,
    /// TLS, for `sslmode=prefer` (the default), `require`, `verify-ca` or
    /// `verify-full`.
    pub tls: rustls::ClientConfig,
    /// Bytes of completed records kept in the process so replays need no
    /// round trip (0: off). See `store/replays.rs`.
    pub replay_cache_bytes: usize,
    /// Counts replay-cache lookups, by `result` (`hit`, `miss`).
    pub replay_cache_lookups: Option<prometheus::IntCounterVec>,
}

impl PostgresOptions {
    /// Options for `url` with the defaults; TLS verified against the
    /// webpki roots.
    pub fn new(url: &str, schema: &str) -> Result<Self, StoreError> {
        let (config, verify) =
            tls::parse(url).map_err(|e| StoreError::Unavailable(format!("PostgreSQL URL: {e}")))?;
        Ok(PostgresOptions {
            config,
            verify,
            schema: schema.to_owned(),
            pool_size: 16,
            timeout: Duration::from_secs(1),
            recheck: RECHECK,
            sealing: Sealing::default(),
            tls: tls::client_config(None, verify).map_err(StoreError::Unavailable)?,
            replay_cache_bytes: 0,
            replay_cache_lookups: None,
        })
    }
}

/// The PostgreSQL backend. Cheap to clone; clones share the pool.
#[derive(Clone)]
pub struct PostgresStore {
    pub(super) inner: Arc<Inner>,
}

pub(super) struct Inner {
    pub(super) db: Db,
    pub(super) recheck: Duration,
    pub(super) sealing: Sealing,
    pub(super) waiters: Arc<Waiters>,
    /// Copies of replayed records, on while the listener hears purges.
    pub(super) replays: Option<Arc<ReplayCache>>,
    pub(super) sql: Sql,
    /// Begins and completions, gathered into batches under load.
    pub(super) steps: Batcher<Step, Stepped>,
}

/// Every statement, the schema filled in.
pub(super) struct Sql {
    pub steps: String,
    pub renew: String,
    pub release: String,
    pub mark_unknown: String,
    pub resolve: String,
    pub get: String,
    pub wait_for: String,
    pub purge: String,
    pub discard: String,
    pub admit: String,
    pub dedup_mark: String,
    pub dedup_claim: String,
    pub dedup_extend: String,
    pub dedup_complete: String,
    pub dedup_release: String,
    pub dedup_inspect: String,
    pub dedup_delete: String,
    pub dedup_list_failed: String,
    pub dedup_purge_failed: String,
    sweep: [String; 3],
}

impl Sql {
    fn new(schema: &str) -> Self {
        let s = quoted(schema);
        let live = format!("expires_ms > {s}.now_ms()");
        Sql {
            steps: format!(
                "SELECT * FROM {s}.step_many($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
            ),
            renew: format!("SELECT {s}.renew_lease($1, $2, $3)"),
            release: format!("SELECT {s}.release_lease($1, $2)"),
            mark_unknown: format!("SELECT {s}.mark_unknown($1, $2, $3, $4)"),
            resolve: format!("SELECT {s}.resolve_unknown($1, $2, $3, $4)"),
            get: format!(
                "SELECT state, token, fence, fp, record, cause, since_ms, next_ms, \
                 expires_ms - {s}.now_ms() FROM {s}.records WHERE key = $1 AND {live}"
            ),
            wait_for: format!("SELECT {s}.wait_for($1, $2)"),
            purge: format!("SELECT {s}.purge_record($1)"),
            // Other replicas may keep a copy (of a record they could read).
            discard: format!(
                "WITH d AS (DELETE FROM {s}.records WHERE key = $1 AND state = 'c' \
                 AND record = $2 RETURNING key) \
                 SELECT pg_notify('{}', encode(key, 'hex')) FROM d",
                schema::replays_channel(schema)
            ),
            admit: format!("SELECT {s}.admit($1, $2, $3, $4)"),
            dedup_mark: format!("SELECT {s}.dedup_mark($1, $2, $3)"),
            dedup_claim: format!(
                "SELECT * FROM {s}.dedup_claim($1, $2, $3, $4, $5, $6, $7, $8, $9)"
            ),
            dedup_extend: format!("SELECT {s}.dedup_extend($1, $2, $3, $4)"),
            dedup_complete: format!("SELECT {s}.dedup_complete($1, $2, $3, $4, $5)"),
            dedup_release: format!("SELECT {s}.dedup_release($1, $2, $3, $4, $5, $6, $7)"),
            dedup_inspect: format!(
                "SELECT state, lease_id, fence, attempts, lease_until_ms, fp, worker, result, \
                 error, at_ms, expires_ms - {s}.now_ms(), {s}.now_ms() \
                 FROM {s}.dedup WHERE scope = $1 AND key = $2 AND {live}"
            ),
            dedup_delete: format!(
                "DELETE FROM {s}.dedup WHERE scope = $1 AND key = $2 RETURNING {live}"
            ),
            dedup_list_failed: format!(
                "SELECT key, attempts, error, at_ms FROM {s}.dedup \
                 WHERE scope = $1 AND state = 'f' AND {live} AND (at_ms, key) > ($2, $3) \
                 ORDER BY at_ms, key LIMIT $4"
            ),
            dedup_purge_failed: format!(
                "WITH d AS (DELETE FROM {s}.dedup WHERE scope = $1 AND state = 'f' \
                 RETURNING {live} AS live) SELECT count(*) FILTER (WHERE live) FROM d"
            ),
            sweep: ["records", "dedup", "buckets"].map(|t| {
                format!(
                    "WITH gone AS (DELETE FROM {s}.{t} WHERE ctid = ANY(ARRAY(\
                     SELECT ctid FROM {s}.{t} WHERE expires_ms <= {s}.now_ms() \
                     LIMIT {SWEEP_BATCH})) AND expires_ms <= {s}.now_ms() RETURNING 1) \
                     SELECT count(*) FROM gone"
                )
            }),
        }
    }
}

impl PostgresStore {
    /// Connects, creates or migrates the schema, starts the listener and
    /// the sweeper. PostgreSQL must answer within the timeout (or 5 s).
    pub async fn connect(options: PostgresOptions) -> Result<Self, StoreError> {
        let PostgresOptions {
            config,
            schema,
            pool_size,
            timeout,
            recheck,
            sealing,
            // Already in `tls`.
            verify: _,
            tls,
            replay_cache_bytes,
            replay_cache_lookups,
        } = options;
        let mut config = config;
        // A host that does not answer (a dead primary behind a firewall)
        // must not hold a connection attempt past the store's bound.
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(timeout.max(Duration::from_secs(1)));
        }
        let tls = MakeRustlsConnect::new(tls);
        let manager = Manager::from_config(
            config.clone(),
            tls.clone(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        // The connection used last goes out first: the few a batch needs
        // stay warm (their backends awake, their caches hot) rather than
        // every call waking the next of `pool_size` in turn; 3-6 % more
        // new keys/s and 6-10 % less PostgreSQL CPU at one client
        // (benches/RESULTS.md).
        let pool = Pool::builder(manager)
            .max_size(pool_size)
            .queue_mode(QueueMode::Lifo)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(timeout))
            .create_timeout(Some(timeout.max(Duration::from_secs(1))))
            .build()
            .map_err(unavailable)?;
        let waiters = Arc::new(Waiters::default());
        let replays = (replay_cache_bytes > 0)
            .then(|| Arc::new(ReplayCache::new(replay_cache_bytes, replay_cache_lookups)));
        // One batch at a time, whatever the pool: the bigger each batch,
        // the less of the database's time per request (benches/RESULTS.md).
        // A second only beside one that has kept a call waiting
        // BATCH_PATIENCE (a row lock, a slow flush), so one held up does
        // not hold up every begin and completion. A batch carries both
        // kinds (`step_many`): one commit where each kind took one. The
        // other calls (renewals, waits, the dedup API) keep the rest of
        // the pool.
        let parallel = BATCHES_IN_FLIGHT.min((pool_size / 2).max(1));
        let inner = Arc::new_cyclic(|me: &Weak<Inner>| {
            let me = me.clone();
            Inner {
                db: Db { pool, timeout },
                recheck,
                sealing,
                waiters: waiters.clone(),
                replays: replays.clone(),
                sql: Sql::new(&schema),
                steps: Batcher::start(parallel, BATCH_PATIENCE, MAX_BATCH, move |items| {
                    let me = me.upgrade();
                    async move {
                        let inner = me.ok_or_else(closing)?;
                        batch::steps(&inner.db, &inner.sql.steps, items).await
                    }
                }),
            }
        });
        let store = PostgresStore { inner };
        let start = timeout.max(Duration::from_secs(5));
        let migrated = tokio::time::timeout(start, store.migrate(&schema))
            .await
            .map_err(|_| StoreError::Timeout(start))??;
        tracing::info!("{migrated}");
        let (listening, heard) = tokio::sync::oneshot::channel();
        tokio::spawn(listen::run(
            config,
            tls,
            listen::Channels {
                done: schema::channel(&schema),
                replays: schema::replays_channel(&schema),
            },
            Arc::downgrade(&waiters),
            replays,
            listening,
        ));
        // Ready once the listener hears settlements and purges (the cache
        // keeps nothing before), within the store's bound: past it the
        // store serves anyway, waiters re-checking on their own.
        if tokio::time::timeout(start, heard).await.is_err() {
            tracing::warn!(
                "the LISTEN connection is not up yet; waiters re-check on their own until it is"
            );
        }
        tokio::spawn(sweeper(Arc::downgrade(&store.inner)));
        Ok(store)
    }

    /// Creates or migrates the schema on one connection and closes it
    /// (`idemgate migrate`, run by a role that may create it).
    pub async fn migrate_only(options: PostgresOptions) -> Result<String, StoreError> {
        let tls = MakeRustlsConnect::new(options.tls);
        let start = options.timeout.max(Duration::from_secs(5));
        let run = async {
            let (mut client, connection) =
                options.config.connect(tls).await.map_err(unavailable)?;
            let driver = tokio::spawn(connection);
            let done = schema::migrate(&mut client, &options.schema).await;
            drop(client);
            let _ = driver.await;
            done
        };
        tokio::time::timeout(start, run)
            .await
            .map_err(|_| StoreError::Timeout(start))?
    }

    /// Creates or migrates the schema (at start).
    async fn migrate(&self, schema: &str) -> Result<String, StoreError> {
        let mut client = self.inner.db.pool.get().await.map_err(unavailable)?;
        schema::migrate(&mut client, schema).await
    }

    pub(super) async fn row(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, StoreError> {
        self.inner.db.row(sql, params).await
    }

    pub(super) async fn rows(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, StoreError> {
        self.inner.db.rows(sql, params).await
    }

    pub(super) async fn pipelined(
        &self,
        sql: &str,
        params: &[Vec<&(dyn ToSql + Sync)>],
    ) -> Result<Vec<Result<Option<Row>, StoreError>>, StoreError> {
        self.inner.db.pipelined(sql, params).await
    }

    pub(super) async fn flag(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<bool, StoreError> {
        self.inner.db.flag(sql, params).await
    }

    /// A batched call, bounded by the store's timeout from the moment it is
    /// asked (a call still queued then is dropped from its batch).
    pub(super) async fn batched<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let bound = self.inner.db.timeout;
        tokio::time::timeout(bound, call)
            .await
            .map_err(|_| StoreError::Timeout(bound))?
    }

    /// Bytes the replay cache holds (0 without one).
    pub fn replay_cache_bytes(&self) -> usize {
        self.inner.replays.as_ref().map_or(0, |r| r.bytes())
    }

    pub(super) async fn ping_inner(&self) -> Result<(), StoreError> {
        self.row("SELECT 1", &[]).await.map(|_| ())
    }

    /// Deletes expired rows, a batch at a time, until none is left.
    async fn sweep(&self) -> Result<i64, StoreError> {
        let mut gone = 0;
        for sql in &self.inner.sql.sweep {
            loop {
                // Each batch one statement, bounded like any call.
                let row = self.row(sql, &[]).await?;
                let n = row.map_or(Ok(0), |r| col::<i64>(&r, 0))?;
                gone += n;
                if n < SWEEP_BATCH {
                    break;
                }
                // Let the traffic in between batches.
                tokio::task::yield_now().await;
            }
        }
        Ok(gone)
    }
}

/// Sweeps every [`SWEEP_EVERY`] while the store lives.
async fn sweeper(inner: Weak<Inner>) {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        let store = PostgresStore { inner };
        if let Err(e) = store.sweep().await {
            tracing::debug!(error = %e, "sweeping expired rows failed; the next sweep tries again");
        }
    }
}
