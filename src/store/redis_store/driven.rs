//! An event loop's own Redis connection, driven by the calls made on it.
//!
//! The redis crate's multiplexed connection hands each command to a task
//! of its own over a channel, and the reply back over a oneshot: per call
//! a channel send, a wake-up of that task, a second task's poll, and the
//! crate's streaming decoder. On an event loop every caller runs on the
//! same thread, so none of that is needed: a call appends its command to
//! the connection's output, and whichever call is polled writes what is
//! pending and reads what has arrived, handing each reply to the call it
//! answers (replies come in the order the commands went out) and waking
//! it. So the loop's requests are pipelined on one socket, and the reply
//! wakes the request that waits for it and nothing else. The first call
//! of a turn of the loop yields once before it writes, so the commands of
//! every request that turn runs go out in one `write` (writing each at
//! once cost Redis a read per command, and more than the task saved); it
//! writes them even if its own went out meanwhile with another call's
//! write, since the calls queued after that wait on it.
//!
//! The socket wakes only the last call that polled it (tokio keeps one
//! waker per direction), so that call is the connection's *driver*: when
//! it ends, finished or dropped (a timeout, a client gone), it wakes a
//! call still waiting, which takes over. A dropped call's reply is still
//! read, and thrown away, so the order holds. An I/O or protocol error
//! breaks the connection: every waiting call gets the error, and the loop
//! opens a new one (`local.rs`). With no task reading it, an idle
//! connection would learn that Redis closed it (a restart) only from the
//! next call, which would then fail: so before a call on a connection idle
//! for [`IDLE_CHECK`], one non-blocking peek asks the socket.
//!
//! The connection speaks RESP3 (`HELLO 3`, with `AUTH` from the URL, then
//! `SELECT`), like the store's shared connection, so a command answers the
//! same on either; it carries no pub/sub. Only plain TCP: a TLS or Unix
//! socket URL keeps the crate's connection per loop.

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use redis::aio::ConnectionLike;
use redis::{Cmd, RedisError, RedisFuture, RedisResult, Value};
use tokio::net::TcpStream;

/// Calls waiting for replies beyond which a connection that is not
/// answering is given up (each waits at most the store's timeout, so on a
/// live connection this many never pile up).
const MOST_WAITING: usize = 1 << 16;

/// How long a connection with no call waiting goes before the next call
/// checks that Redis has not closed it.
pub(super) const IDLE_CHECK: Duration = Duration::from_millis(100);

/// How many bytes a read asks for at least.
const READ_CHUNK: usize = 16 * 1024;

/// A loop's connection; clones share it.
#[derive(Clone)]
pub(super) struct Driven {
    state: Arc<Mutex<State>>,
    db: i64,
}

/// One call: the replies it waits for, and who to wake.
struct Entry {
    need: usize,
    got: Vec<Value>,
    waker: Option<Waker>,
    /// Its future was dropped: its replies are read and dropped.
    gone: bool,
}

struct State {
    stream: TcpStream,
    /// Commands not yet written.
    out: Vec<u8>,
    /// Bytes read; those before `start` are parsed.
    input: Vec<u8>,
    start: usize,
    /// Calls in the order their commands went out; `entries[0]` is call
    /// `base`, and the replies read so far filled the calls before
    /// `filling`.
    entries: VecDeque<Entry>,
    base: u64,
    filling: usize,
    /// The call whose waker the socket holds.
    driver: Option<u64>,
    /// The call that writes the commands queued in this turn of the loop.
    flusher: Option<u64>,
    /// Why the connection is unusable, once it is.
    broken: Option<(io::ErrorKind, String)>,
    /// When the last call was queued.
    used: Instant,
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    // A panic under the lock leaves the buffers as they were; a call that
    // then finds the stream out of step breaks the connection itself.
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Driven {
    /// Connects to `host:port`, then says `HELLO 3` (with `AUTH` when a
    /// password is given) and selects `db`, all within `bound`.
    pub(super) async fn open(
        host: &str,
        port: u16,
        settings: &redis::RedisConnectionInfo,
        bound: Duration,
    ) -> RedisResult<Driven> {
        let opening = async {
            let stream = TcpStream::connect((host, port)).await?;
            stream.set_nodelay(true)?;
            let mut conn = Driven {
                state: Arc::new(Mutex::new(State {
                    stream,
                    out: Vec::new(),
                    input: Vec::with_capacity(READ_CHUNK),
                    start: 0,
                    entries: VecDeque::new(),
                    base: 0,
                    filling: 0,
                    driver: None,
                    flusher: None,
                    broken: None,
                    used: Instant::now(),
                })),
                db: settings.db(),
            };
            let mut hello = redis::cmd("HELLO");
            hello.arg(3);
            if let Some(password) = settings.password() {
                hello
                    .arg("AUTH")
                    .arg(settings.username().unwrap_or("default"))
                    .arg(password);
            }
            hello.query_async::<Value>(&mut conn).await?;
            if settings.db() != 0 {
                redis::cmd("SELECT")
                    .arg(settings.db())
                    .query_async::<()>(&mut conn)
                    .await?;
            }
            Ok(conn)
        };
        match tokio::time::timeout(bound, opening).await {
            Ok(r) => r,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no connection within {bound:?}"),
            )
            .into()),
        }
    }

    /// Whether the connection broke (the loop then opens another). One
    /// idle for [`IDLE_CHECK`] is asked first whether Redis closed it.
    pub(super) fn is_broken(&self) -> bool {
        let mut st = lock(&self.state);
        if st.broken.is_none() && st.entries.is_empty() && st.used.elapsed() >= IDLE_CHECK {
            let mut byte = [MaybeUninit::uninit()];
            match socket2::SockRef::from(&st.stream).peek(&mut byte) {
                Ok(0) => st.break_with(
                    io::ErrorKind::UnexpectedEof,
                    "Redis closed the connection while it was idle".into(),
                ),
                Err(e) if e.kind() != io::ErrorKind::WouldBlock => {
                    st.break_with(e.kind(), e.to_string())
                }
                // Nothing to read, as on a live idle connection (a push
                // message is read and skipped by the next call).
                _ => st.used = Instant::now(),
            }
        }
        st.broken.is_some()
    }

    /// Queues a command (written by `write`) answered by `need` replies.
    fn send(&self, need: usize, write: impl FnOnce(&mut Vec<u8>)) -> RedisResult<Call> {
        let mut st = lock(&self.state);
        if let Some(e) = &st.broken {
            return Err(broken_error(e));
        }
        if st.entries.len() >= MOST_WAITING {
            st.break_with(
                io::ErrorKind::TimedOut,
                format!("{MOST_WAITING} calls waiting and none answered"),
            );
            return Err(broken_error(st.broken.as_ref().expect("just set")));
        }
        write(&mut st.out);
        st.used = Instant::now();
        st.entries.push_back(Entry {
            need,
            got: Vec::with_capacity(need),
            waker: None,
            gone: false,
        });
        let id = st.base + st.entries.len() as u64 - 1;
        Ok(Call {
            state: self.state.clone(),
            id,
            polled: false,
            done: false,
        })
    }
}

fn broken_error((kind, why): &(io::ErrorKind, String)) -> RedisError {
    io::Error::new(*kind, format!("the loop's Redis connection broke: {why}")).into()
}

impl State {
    fn index(&self, id: u64) -> usize {
        (id - self.base) as usize
    }

    fn is_answered(&self, id: u64) -> bool {
        self.index(id) < self.filling
    }

    /// Writes what is pending and reads what has arrived, until the socket
    /// would block (the caller's waker then waits on it).
    fn drive(&mut self, cx: &mut Context<'_>, id: u64) {
        while !self.out.is_empty() {
            match self.stream.poll_write_ready(cx) {
                Poll::Pending => {
                    self.driver = Some(id);
                    break;
                }
                Poll::Ready(Err(e)) => return self.break_with(e.kind(), e.to_string()),
                Poll::Ready(Ok(())) => match self.stream.try_write(&self.out) {
                    Ok(n) => {
                        self.out.drain(..n);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return self.break_with(e.kind(), e.to_string()),
                },
            }
        }
        loop {
            match self.stream.poll_read_ready(cx) {
                Poll::Pending => {
                    self.driver = Some(id);
                    return;
                }
                Poll::Ready(Err(e)) => return self.break_with(e.kind(), e.to_string()),
                Poll::Ready(Ok(())) => {}
            }
            if self.start == self.input.len() {
                self.input.clear();
                self.start = 0;
            }
            self.input.reserve(READ_CHUNK);
            match self.stream.try_read_buf(&mut self.input) {
                Ok(0) => {
                    return self.break_with(
                        io::ErrorKind::UnexpectedEof,
                        "Redis closed the connection".into(),
                    )
                }
                Ok(_) => {
                    if let Err(why) = self.parse_replies() {
                        return self.break_with(io::ErrorKind::InvalidData, why);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return self.break_with(e.kind(), e.to_string()),
            }
        }
    }

    /// Hands every whole reply read to the call it answers.
    fn parse_replies(&mut self) -> Result<(), String> {
        while let Some((value, used)) = parse(&self.input[self.start..])? {
            self.start += used;
            if matches!(value, Value::Push { .. }) {
                continue; // none is asked for; nothing waits for one
            }
            let Some(entry) = self.entries.get_mut(self.filling) else {
                return Err("a reply no command asked for".into());
            };
            entry.got.push(value);
            if entry.got.len() == entry.need {
                self.filling += 1;
                if let Some(w) = entry.waker.take() {
                    w.wake();
                }
            }
        }
        if self.start > READ_CHUNK && self.start * 2 > self.input.len() {
            self.input.drain(..self.start);
            self.start = 0;
        }
        self.drop_finished();
        Ok(())
    }

    /// Forgets answered calls at the front whose futures are gone.
    fn drop_finished(&mut self) {
        while self.filling > 0 && self.entries.front().is_some_and(|e| e.gone) {
            self.entries.pop_front();
            self.base += 1;
            self.filling -= 1;
        }
    }

    /// The call `id` ended (answered, failed or dropped): if it was the
    /// driver, or the flusher before its write, a waiting call takes over.
    fn end(&mut self, id: u64) {
        let at = self.index(id);
        if let Some(e) = self.entries.get_mut(at) {
            e.gone = true;
            e.waker = None;
        }
        self.drop_finished();
        let (flusher, driver) = (self.flusher == Some(id), self.driver == Some(id));
        if flusher {
            self.flusher = None;
        }
        if driver {
            self.driver = None;
        }
        if flusher || driver {
            if let Some(w) = self.entries.iter_mut().find_map(|e| e.waker.take()) {
                w.wake();
            }
        }
    }

    fn break_with(&mut self, kind: io::ErrorKind, why: String) {
        if self.broken.is_none() {
            tracing::warn!(error = %why, "an event loop's Redis connection broke; it opens another");
            self.broken = Some((kind, why));
        }
        for e in &mut self.entries {
            if let Some(w) = e.waker.take() {
                w.wake();
            }
        }
    }
}

/// A call's future: its replies, once read.
struct Call {
    state: Arc<Mutex<State>>,
    id: u64,
    /// Polled before: its command is queued for this turn's write.
    polled: bool,
    done: bool,
}

impl Future for Call {
    type Output = RedisResult<Vec<Value>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let mut st = lock(&this.state);
        let first = !std::mem::replace(&mut this.polled, true);
        if first && st.broken.is_none() {
            // One write for the commands of every request this turn of
            // the loop runs: the first call yields once and then writes
            // them all; the others wait for their replies.
            if st.flusher.is_none() {
                st.flusher = Some(this.id);
                cx.waker().wake_by_ref();
            }
            let at = st.index(this.id);
            st.entries[at].waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        // The flusher writes the turn's commands even when its own was
        // written and answered meanwhile (by a call woken for its reply):
        // the calls queued after that write wait on it.
        let flushes = st.flusher == Some(this.id);
        if flushes {
            st.flusher = None;
        }
        if (flushes || !st.is_answered(this.id)) && st.broken.is_none() {
            st.drive(cx, this.id);
        }
        if st.is_answered(this.id) {
            let at = st.index(this.id);
            let got = std::mem::take(&mut st.entries[at].got);
            st.end(this.id);
            this.done = true;
            return Poll::Ready(Ok(got));
        }
        if let Some(e) = &st.broken {
            let err = broken_error(e);
            st.end(this.id);
            this.done = true;
            return Poll::Ready(Err(err));
        }
        let at = st.index(this.id);
        let entry = &mut st.entries[at];
        if !entry
            .waker
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            entry.waker = Some(cx.waker().clone());
        }
        Poll::Pending
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        if !self.done {
            lock(&self.state).end(self.id);
        }
    }
}

impl ConnectionLike for Driven {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        let call = self.send(1, |out| cmd.write_packed_command(out));
        Box::pin(async move {
            let mut got = call?.await?;
            Ok(got.pop().unwrap_or(Value::Nil))
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        // A transaction's replies start with MULTI's and each QUEUED:
        // every reply is read, the last `count` returned.
        let call = self.send(offset + count, |out| {
            out.extend_from_slice(&pipeline.get_packed_pipeline())
        });
        Box::pin(async move {
            let mut got = call?.await?;
            Ok(got.split_off(offset.min(got.len())))
        })
    }

    fn get_db(&self) -> i64 {
        self.db
    }
}

/// A RESP2/RESP3 reply at the start of `buf` and the bytes it takes, or
/// `None` while it is incomplete. The replies the store's commands get
/// are built here; the rarer kinds (errors, doubles, big numbers,
/// verbatim strings, attributes) are measured here and built by the redis
/// crate's parser, so they read exactly as on its connections.
fn parse(buf: &[u8]) -> Result<Option<(Value, usize)>, String> {
    let Some((kind, line, body)) = header(buf, 0)? else {
        return Ok(None);
    };
    let whole = |end: Option<usize>| -> Result<Option<(Value, usize)>, String> {
        let Some(end) = end else { return Ok(None) };
        let v = redis::parse_redis_value(&buf[..end]).map_err(|e| e.to_string())?;
        Ok(Some((v, end)))
    };
    Ok(Some(match kind {
        b'+' if line == b"OK" => (Value::Okay, body),
        b'+' => (
            Value::SimpleString(String::from_utf8_lossy(line).into_owned()),
            body,
        ),
        b':' => (Value::Int(number(line)?), body),
        b'_' => (Value::Nil, body),
        b'#' => (Value::Boolean(line == b"t"), body),
        b'$' => {
            let n = number(line)?;
            if n < 0 {
                return Ok(Some((Value::Nil, body)));
            }
            let end = body + n as usize;
            if buf.len() < end + 2 {
                return Ok(None);
            }
            if &buf[end..end + 2] != b"\r\n" {
                return Err("a bulk string longer than it said".into());
            }
            (Value::BulkString(buf[body..end].to_vec()), end + 2)
        }
        b'*' | b'~' | b'>' => {
            let n = number(line)?;
            if n < 0 {
                return Ok(Some((Value::Nil, body)));
            }
            let mut items = Vec::with_capacity((n as usize).min(1024));
            let mut at = body;
            for _ in 0..n {
                let Some((v, used)) = parse(&buf[at..])? else {
                    return Ok(None);
                };
                items.push(v);
                at += used;
            }
            let v = match kind {
                b'*' => Value::Array(items),
                b'~' => Value::Set(items),
                _ => return whole(Some(at)),
            };
            (v, at)
        }
        b'%' => {
            let n = number(line)?;
            let mut pairs = Vec::with_capacity((n.max(0) as usize).min(1024));
            let mut at = body;
            for _ in 0..n.max(0) {
                let Some((k, used)) = parse(&buf[at..])? else {
                    return Ok(None);
                };
                at += used;
                let Some((v, used)) = parse(&buf[at..])? else {
                    return Ok(None);
                };
                at += used;
                pairs.push((k, v));
            }
            (Value::Map(pairs), at)
        }
        _ => return whole(skip(buf, 0)?),
    }))
}

/// A reply's first line: its kind byte, the rest of the line, and where
/// what follows the line starts.
type Header<'a> = (u8, &'a [u8], usize);

/// The first line of the reply at `at`; `None` while it is incomplete.
fn header(buf: &[u8], at: usize) -> Result<Option<Header<'_>>, String> {
    let Some(&kind) = buf.get(at) else {
        return Ok(None);
    };
    let Some(cr) = buf[at..].iter().position(|&b| b == b'\r') else {
        return Ok(None);
    };
    let cr = at + cr;
    match buf.get(cr + 1) {
        None => Ok(None),
        Some(b'\n') => Ok(Some((kind, &buf[at + 1..cr], cr + 2))),
        Some(_) => Err("a reply line not ended by CRLF".into()),
    }
}

/// Where the reply at `at` ends (any kind), or `None` while incomplete.
fn skip(buf: &[u8], at: usize) -> Result<Option<usize>, String> {
    let Some((kind, line, body)) = header(buf, at)? else {
        return Ok(None);
    };
    match kind {
        b'+' | b'-' | b':' | b'_' | b'#' | b',' | b'(' => Ok(Some(body)),
        b'$' | b'=' | b'!' => {
            let n = number(line)?;
            if n < 0 {
                return Ok(Some(body));
            }
            let end = body + n as usize + 2;
            Ok((buf.len() >= end).then_some(end))
        }
        b'*' | b'~' | b'>' | b'%' | b'|' => {
            let n = number(line)?;
            let items = match kind {
                b'%' => 2 * n.max(0),
                b'|' => 2 * n.max(0) + 1, // the attributes, then the reply
                _ => n.max(0),
            };
            let mut at = body;
            for _ in 0..items {
                match skip(buf, at)? {
                    Some(end) => at = end,
                    None => return Ok(None),
                }
            }
            Ok(Some(at))
        }
        other => Err(format!("a reply of unknown kind {:?}", other as char)),
    }
}

fn number(line: &[u8]) -> Result<i64, String> {
    std::str::from_utf8(line)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("not a number: {:?}", String::from_utf8_lossy(line)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every prefix of a reply is incomplete; the whole parses to what the
    /// redis crate's parser makes of it.
    fn same_as_the_crate(reply: &[u8]) {
        for cut in 0..reply.len() {
            assert_eq!(parse(&reply[..cut]), Ok(None), "{cut} bytes of {reply:?}");
        }
        let mut longer = reply.to_vec();
        longer.extend_from_slice(b"+next\r\n");
        let (v, used) = parse(&longer).unwrap().unwrap();
        assert_eq!(used, reply.len());
        assert_eq!(v, redis::parse_redis_value(reply).unwrap(), "{reply:?}");
    }

    #[test]
    fn replies_parse_as_the_crate_parses_them() {
        for reply in [
            &b"+OK\r\n"[..],
            b"+PONG\r\n",
            b":-42\r\n",
            b"$5\r\nhe\r\no\r\n",
            b"$0\r\n\r\n",
            b"$-1\r\n",
            b"*-1\r\n",
            b"_\r\n",
            b"#t\r\n",
            b"*3\r\n$1\r\na\r\n:7\r\n*2\r\n$-1\r\n+x\r\n",
            b"%2\r\n+a\r\n:1\r\n$1\r\nb\r\n*0\r\n",
            b"~2\r\n:1\r\n:2\r\n",
            b"-NOSCRIPT No matching script.\r\n",
            b"*2\r\n-ERR one\r\n:1\r\n",
            b",1.5\r\n",
            b"=8\r\ntxt:abcd\r\n",
            b">2\r\n+message\r\n$1\r\nx\r\n",
        ] {
            same_as_the_crate(reply);
        }
    }

    #[test]
    fn a_malformed_reply_is_an_error_not_a_guess() {
        assert!(parse(b"$x\r\n").is_err());
        assert!(parse(b"+OK\rX").is_err());
        assert!(parse(b"?1\r\n").is_err());
        assert!(parse(b"$2\r\nabc\r\n").is_err());
    }
}
