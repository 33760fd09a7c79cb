//! The calls every part makes: one statement on a pooled connection,
//! prepared once per connection, bounded by `store.timeout` from the wait
//! for a connection to the last row ([`Db`]); and the conversions between
//! rows and the contract's types that every part shares.

use std::time::Duration;

use deadpool_postgres::{Object, Pool};
use tokio::time::Instant;
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

use super::tls;
use crate::store::error::StoreError;

/// An error as unavailability, with its causes: tokio-postgres says only
/// "db error" and keeps the server's message as the source.
pub(super) fn unavailable(e: impl std::error::Error) -> StoreError {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text = format!("{text}: {more}");
        }
        source = s.source();
    }
    text.push_str(tls::hint(&text));
    StoreError::Unavailable(text)
}

pub(super) fn malformed(what: &str) -> StoreError {
    StoreError::Unavailable(format!("unexpected answer from {what}"))
}

/// Milliseconds as a statement argument; at least 1.
pub(super) fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX).max(1)
}

/// A column of a row, or a malformed answer.
pub(super) fn col<'a, T: tokio_postgres::types::FromSql<'a>>(
    row: &'a Row,
    i: usize,
) -> Result<T, StoreError> {
    row.try_get(i).map_err(unavailable)
}

/// The pool and the bound on every call.
pub(super) struct Db {
    pub pool: Pool,
    pub timeout: Duration,
}

impl Db {
    /// A pooled connection, within the timeout.
    async fn client(&self) -> Result<Object, StoreError> {
        self.pool.get().await.map_err(|e| match e {
            deadpool_postgres::PoolError::Timeout(_) => StoreError::Timeout(self.timeout),
            other => unavailable(other),
        })
    }

    /// A pooled connection by `deadline`.
    async fn client_by(&self, deadline: Instant) -> Result<Object, StoreError> {
        tokio::time::timeout_at(deadline, self.client())
            .await
            .map_err(|_| StoreError::Timeout(self.timeout))?
    }

    /// The end of a call that ran out of time: its connection is not given
    /// back to the pool (it may hang on a server that stopped answering, a
    /// partitioned primary); a fresh one replaces it.
    fn timed_out(&self, client: Object) -> StoreError {
        drop(Object::take(client));
        StoreError::Timeout(self.timeout)
    }

    /// Runs one statement for one row (`None`: no row), bounded by the
    /// store's timeout, the pool wait included.
    pub(super) async fn row(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, StoreError> {
        let deadline = Instant::now() + self.timeout;
        let client = self.client_by(deadline).await?;
        let call = async {
            let stmt = client.prepare_cached(sql).await.map_err(unavailable)?;
            client.query_opt(&stmt, params).await.map_err(unavailable)
        };
        match tokio::time::timeout_at(deadline, call).await {
            Ok(r) => r,
            Err(_) => Err(self.timed_out(client)),
        }
    }

    /// [`Self::row`] for every row.
    pub(super) async fn rows(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, StoreError> {
        let deadline = Instant::now() + self.timeout;
        let client = self.client_by(deadline).await?;
        let call = async {
            let stmt = client.prepare_cached(sql).await.map_err(unavailable)?;
            client.query(&stmt, params).await.map_err(unavailable)
        };
        match tokio::time::timeout_at(deadline, call).await {
            Ok(r) => r,
            Err(_) => Err(self.timed_out(client)),
        }
    }

    /// One statement for each parameter list, pipelined on one connection
    /// (one prepare, the calls sent without waiting for each answer); one
    /// answer per list, in order.
    pub(super) async fn pipelined(
        &self,
        sql: &str,
        params: &[Vec<&(dyn ToSql + Sync)>],
    ) -> Result<Vec<Result<Option<Row>, StoreError>>, StoreError> {
        let deadline = Instant::now() + self.timeout;
        let client = self.client_by(deadline).await?;
        let call = async {
            let stmt = client.prepare_cached(sql).await.map_err(unavailable)?;
            let calls = params.iter().map(|p| client.query_opt(&stmt, p.as_slice()));
            let answers = futures_util::future::join_all(calls).await;
            Ok(answers
                .into_iter()
                .map(|r| r.map_err(unavailable))
                .collect())
        };
        match tokio::time::timeout_at(deadline, call).await {
            Ok(r) => r,
            Err(_) => Err(self.timed_out(client)),
        }
    }

    /// A function call that answers one boolean.
    pub(super) async fn flag(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<bool, StoreError> {
        let row = self.row(sql, params).await?;
        Ok(row
            .and_then(|r| r.get::<_, Option<bool>>(0))
            .unwrap_or(false))
    }
}
