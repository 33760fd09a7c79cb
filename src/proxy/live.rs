//! A covered response while it streams ("live"): the detached job pushes
//! the upstream's chunks in as they arrive, and its trailers when they come;
//! the first client and any duplicates that join on this replica read them
//! from here, each at its own pace, byte for byte the same, the trailers
//! last.
//!
//! Memory is bounded by the route's `max_response_body`: while the body
//! fits, every chunk is kept (it becomes the record, as before). Once it
//! outgrows the limit the record will be body-omitted, and the buffer
//! becomes a window of at most `max_response_body` bytes (plus one chunk):
//! chunks the first client has read are dropped from the front; when the
//! first client is a whole window behind, the job stops reading the
//! upstream until it catches up (the backpressure a pass-through has).
//! A joiner that falls out of the window is cut off with an error, and so
//! is every reader when the upstream breaks off: hyper then aborts the
//! response (HTTP/1.1 without the last chunk, h2 with `RST_STREAM`), so no
//! client ever sees a truncated body end cleanly.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use tokio::sync::Notify;

use crate::idempotency::key::{KeyHashes, RecordKey};
use crate::idempotency::record::Origin;
use crate::{Body, BoxError};

/// One streaming covered response.
pub(super) struct Live {
    pub fence: u64,
    /// The trace of the request that runs it (traces on): joiners link to it.
    pub origin: Option<Origin>,
    bound: u64,
    buf: Mutex<Buf>,
    /// Woken on every change a reader or the job may wait for.
    changed: Notify,
}

/// The response head as joiners get it (stored headers).
pub(super) struct Head {
    pub status: StatusCode,
    pub headers: HeaderMap,
}

#[derive(Default)]
struct Buf {
    /// `Some` once the head arrived; `joinable` says whether it will be
    /// stored (and may be joined).
    head: Option<(Arc<Head>, bool)>,
    chunks: VecDeque<Bytes>,
    /// Absolute index of `chunks[0]`.
    base: usize,
    /// Bytes in `chunks`.
    window: u64,
    /// Bytes pushed in all.
    total: u64,
    /// Past `bound`: the front may be dropped, the record omits the body.
    overflowed: bool,
    /// The trailers that followed the body, once they came.
    trailers: Option<HeaderMap>,
    /// How the stream ended: cleanly, or with the error every reader gets.
    end: Option<Result<(), String>>,
    /// The first client's next chunk index, while it reads.
    first_at: Option<usize>,
}

impl Live {
    #[cfg(test)]
    pub fn new(fence: u64, bound: u64) -> Arc<Self> {
        Self::traced(fence, bound, None)
    }

    /// [`Self::new`] for a request whose trace joiners link to.
    pub fn traced(fence: u64, bound: u64, origin: Option<Origin>) -> Arc<Self> {
        Arc::new(Live {
            fence,
            origin,
            bound,
            buf: Mutex::new(Buf::default()),
            changed: Notify::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Buf> {
        // A panic elsewhere while holding it leaves plain data; go on.
        self.buf.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The head arrived; `joinable`: its response will be stored.
    pub fn set_head(&self, head: Head, joinable: bool) {
        self.lock().head = Some((Arc::new(head), joinable));
        self.changed.notify_waiters();
    }

    /// Appends a chunk; past the bound, waits until the first client is
    /// less than a window behind.
    pub async fn push(&self, chunk: Bytes) {
        let len = chunk.len() as u64;
        loop {
            let wait = self.changed.notified();
            tokio::pin!(wait);
            wait.as_mut().enable();
            {
                let mut b = self.lock();
                if b.total + len > self.bound {
                    b.overflowed = true;
                }
                if b.overflowed {
                    // Drop what the first client has read, down to the
                    // window (all of it past the bound once it has left).
                    while b.window + len > self.bound {
                        let Some(front) = b.chunks.front() else { break };
                        if b.first_at.is_some_and(|at| at <= b.base) {
                            break;
                        }
                        b.window -= front.len() as u64;
                        b.chunks.pop_front();
                        b.base += 1;
                    }
                }
                if !b.overflowed || b.window < self.bound {
                    b.window += len;
                    b.total += len;
                    b.chunks.push_back(chunk);
                    drop(b);
                    self.changed.notify_waiters();
                    return;
                }
            }
            wait.await;
        }
    }

    /// The trailers arrived (readers get them after the last chunk).
    pub fn trailers(&self, trailers: HeaderMap) {
        self.lock()
            .trailers
            .get_or_insert_with(HeaderMap::new)
            .extend(trailers);
    }

    /// The stream ended: cleanly, or broken off with `why`.
    pub fn finish(&self, end: Result<(), String>) {
        self.lock().end = Some(end);
        self.changed.notify_waiters();
    }

    /// The whole body, if it was kept (it did not outgrow the bound), in
    /// a buffer of its own: a chunk is a slice of the upstream connection's
    /// read buffer, and a stored record holding it would pin that whole
    /// buffer for the record's life (kilobytes per small response, which no
    /// byte bound counts); and the trailers (empty: none).
    pub fn recorded(&self) -> (Option<Bytes>, HeaderMap) {
        let b = self.lock();
        let trailers = b.trailers.clone().unwrap_or_default();
        if b.overflowed {
            return (None, trailers);
        }
        let body = match b.chunks.len() {
            0 => Bytes::new(),
            1 => Bytes::copy_from_slice(&b.chunks[0]),
            _ => {
                let mut out = BytesMut::with_capacity(b.total as usize);
                for c in &b.chunks {
                    out.extend_from_slice(c);
                }
                out.freeze()
            }
        };
        (Some(body), trailers)
    }

    /// The body the first client reads. `length` is the `Content-Length`
    /// it is sent with: its last byte is held back until the stream ends
    /// cleanly, since with a known length that byte is the end the client
    /// sees (without one, the end is the terminating chunk, or HTTP/2's
    /// `END_STREAM`, which come at the clean end anyway).
    pub fn first_reader(self: &Arc<Self>, length: Option<u64>) -> Body {
        self.lock().first_at = Some(0);
        reader(Cursor {
            live: self.clone(),
            at: 0,
            first: true,
            trailed: false,
            hold: length.map(|length| Hold {
                length,
                sent: 0,
                held: None,
            }),
        })
    }

    /// Waits for the head; then, if the response will be stored and every
    /// byte is still here, the head and a body from the first byte. `None`:
    /// wait for the record instead (not stored, grown past the bound, or
    /// the call failed before its head).
    pub async fn join(self: &Arc<Self>) -> Option<(Arc<Head>, Body)> {
        loop {
            let wait = self.changed.notified();
            tokio::pin!(wait);
            wait.as_mut().enable();
            {
                let b = self.lock();
                match &b.head {
                    Some((head, true)) if b.base == 0 && !b.overflowed => {
                        let head = head.clone();
                        drop(b);
                        let body = reader(Cursor {
                            live: self.clone(),
                            at: 0,
                            first: false,
                            trailed: false,
                            hold: None,
                        });
                        return Some((head, body));
                    }
                    Some(_) => return None,
                    None if b.end.is_some() => return None,
                    None => {}
                }
            }
            wait.await;
        }
    }
}

/// One reader's place in the stream.
struct Cursor {
    live: Arc<Live>,
    at: usize,
    /// The first client paces the job; joiners do not.
    first: bool,
    /// Whether this reader has had the trailers.
    trailed: bool,
    /// A body of known length: its last byte waits for the clean end.
    hold: Option<Hold>,
}

/// A reader's place in a body of known length.
struct Hold {
    length: u64,
    sent: u64,
    /// The last byte, once it came, until the clean end.
    held: Option<Bytes>,
}

impl Hold {
    /// What of `chunk` may go now: all of it but a last byte that
    /// completes the length.
    fn pass(&mut self, mut chunk: Bytes) -> Option<Bytes> {
        let end = self.sent + chunk.len() as u64;
        if end >= self.length && !chunk.is_empty() {
            self.held = Some(chunk.split_off(chunk.len() - 1));
        }
        self.sent = end;
        (!chunk.is_empty()).then_some(chunk)
    }
}

impl Drop for Cursor {
    fn drop(&mut self) {
        if self.first {
            // The first client left (or finished): it no longer paces.
            self.live.lock().first_at = None;
            self.live.changed.notify_waiters();
        }
    }
}

impl Cursor {
    async fn next(&mut self) -> Option<Result<Frame<Bytes>, BoxError>> {
        loop {
            let wait = self.live.changed.notified();
            tokio::pin!(wait);
            wait.as_mut().enable();
            {
                let mut b = self.live.lock();
                if self.at < b.base {
                    return Some(Err(
                        "this reader fell further behind the stream than max_response_body".into(),
                    ));
                }
                if let Some(chunk) = b.chunks.get(self.at - b.base).cloned() {
                    self.at += 1;
                    let wake = self.first && b.overflowed;
                    if self.first {
                        b.first_at = Some(self.at);
                    }
                    drop(b);
                    if wake {
                        self.live.changed.notify_waiters();
                    }
                    let chunk = match &mut self.hold {
                        None => Some(chunk),
                        Some(hold) => hold.pass(chunk),
                    };
                    match chunk {
                        Some(chunk) => return Some(Ok(Frame::data(chunk))),
                        None => continue,
                    }
                }
                match &b.end {
                    Some(Ok(())) => {
                        if let Some(last) = self.hold.as_mut().and_then(|h| h.held.take()) {
                            return Some(Ok(Frame::data(last)));
                        }
                        if !self.trailed {
                            self.trailed = true;
                            if let Some(t) = &b.trailers {
                                return Some(Ok(Frame::trailers(t.clone())));
                            }
                        }
                        return None;
                    }
                    Some(Err(why)) => return Some(Err(why.clone().into())),
                    None => {}
                }
            }
            wait.await;
        }
    }
}

fn reader(cursor: Cursor) -> Body {
    let stream = futures_util::stream::unfold(cursor, |mut c| async move {
        let item = c.next().await?;
        Some((item, c))
    });
    StreamBody::new(stream).boxed()
}

/// The live responses of this process, by record key.
#[derive(Default)]
pub(super) struct Lives {
    map: Mutex<HashMap<RecordKey, Arc<Live>, KeyHashes>>,
}

impl Lives {
    fn lock(&self) -> MutexGuard<'_, HashMap<RecordKey, Arc<Live>, KeyHashes>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn insert(&self, key: RecordKey, live: Arc<Live>) {
        self.lock().insert(key, live);
    }

    /// The live response of the attempt with `fence`, if it is this
    /// process's.
    pub fn get(&self, key: &RecordKey, fence: u64) -> Option<Arc<Live>> {
        self.lock().get(key).filter(|l| l.fence == fence).cloned()
    }

    /// Forgets `live` (and only it: a later attempt may own the key now).
    pub fn remove(&self, key: &RecordKey, live: &Arc<Live>) {
        let mut map = self.lock();
        if map.get(key).is_some_and(|l| Arc::ptr_eq(l, live)) {
            map.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn read_all(mut body: Body) -> Result<Vec<u8>, String> {
        let mut out = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| e.to_string())?;
            if let Ok(d) = frame.into_data() {
                out.extend_from_slice(&d);
            }
        }
        Ok(out)
    }

    fn head() -> Head {
        Head {
            status: StatusCode::OK,
            headers: HeaderMap::new(),
        }
    }

    #[tokio::test]
    async fn first_reader_and_joiner_get_the_same_bytes() {
        let live = Live::new(1, 1 << 20);
        live.set_head(head(), true);
        let first = tokio::spawn(read_all(live.first_reader(None)));
        live.push(Bytes::from_static(b"data: 1\n\n")).await;
        let (_, joined) = live.join().await.unwrap();
        let joiner = tokio::spawn(read_all(joined));
        live.push(Bytes::from_static(b"data: 2\n\n")).await;
        live.finish(Ok(()));
        let want = b"data: 1\n\ndata: 2\n\n".to_vec();
        assert_eq!(first.await.unwrap().unwrap(), want);
        assert_eq!(joiner.await.unwrap().unwrap(), want);
        assert_eq!(live.recorded().0.unwrap(), want);
    }

    #[tokio::test]
    async fn a_break_reaches_every_reader_as_an_error() {
        let live = Live::new(1, 1 << 20);
        live.set_head(head(), true);
        let first = tokio::spawn(read_all(live.first_reader(None)));
        live.push(Bytes::from_static(b"part")).await;
        let (_, joined) = live.join().await.unwrap();
        live.finish(Err("upstream reset".into()));
        assert!(first.await.unwrap().is_err());
        assert!(read_all(joined).await.is_err());
    }

    #[tokio::test]
    async fn past_the_bound_the_window_follows_the_first_reader() {
        let live = Live::new(1, 1000);
        live.set_head(head(), true);
        let (_, slow_joiner) = live.join().await.unwrap();
        let first = tokio::spawn(read_all(live.first_reader(None)));
        let chunk = Bytes::from(vec![7u8; 100]);
        for _ in 0..100 {
            live.push(chunk.clone()).await;
        }
        live.finish(Ok(()));
        assert_eq!(first.await.unwrap().unwrap().len(), 10_000);
        assert!(live.recorded().0.is_none(), "the record omits the body");
        {
            let b = live.lock();
            assert!(b.window <= 1000 + 100, "window {}", b.window);
        }
        // The joiner never read: it fell out of the window.
        assert!(read_all(slow_joiner).await.is_err());
        // A new joiner cannot get every byte any more.
        assert!(live.join().await.is_none());
    }

    #[tokio::test]
    async fn a_slow_first_reader_holds_the_job_back() {
        let live = Live::new(1, 300);
        live.set_head(head(), true);
        let mut first = live.first_reader(None);
        let pusher = {
            let live = live.clone();
            tokio::spawn(async move {
                for _ in 0..10 {
                    live.push(Bytes::from(vec![1u8; 100])).await;
                }
                live.finish(Ok(()));
            })
        };
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(
            !pusher.is_finished(),
            "pushed past the window with no reader progress"
        );
        assert!(live.lock().window <= 400);
        let mut n = 0;
        while let Some(f) = first.frame().await {
            n += f.unwrap().into_data().unwrap().len();
        }
        assert_eq!(n, 1000);
        pusher.await.unwrap();
    }

    #[tokio::test]
    async fn an_unstored_head_or_a_failure_before_it_is_not_joined() {
        let live = Live::new(1, 1 << 20);
        live.set_head(head(), false);
        assert!(live.join().await.is_none());
        let live = Live::new(2, 1 << 20);
        live.finish(Err("connect refused".into()));
        assert!(live.join().await.is_none());
    }

    async fn frames(mut body: Body) -> (Vec<u8>, Option<HeaderMap>) {
        let (mut data, mut trailers) = (Vec::new(), None);
        while let Some(f) = body.frame().await {
            match f.unwrap().into_data() {
                Ok(d) => data.extend_from_slice(&d),
                Err(f) => trailers = f.into_trailers().ok(),
            }
        }
        (data, trailers)
    }

    #[tokio::test]
    async fn trailers_reach_every_reader_last_and_the_record() {
        let live = Live::new(1, 1 << 20);
        live.set_head(head(), true);
        let first = tokio::spawn(frames(live.first_reader(None)));
        live.push(Bytes::from_static(b"grpc")).await;
        let (_, joined) = live.join().await.unwrap();
        let joiner = tokio::spawn(frames(joined));
        let mut t = HeaderMap::new();
        t.insert("grpc-status", "0".parse().unwrap());
        live.trailers(t.clone());
        live.finish(Ok(()));
        for reader in [first, joiner] {
            assert_eq!(reader.await.unwrap(), (b"grpc".to_vec(), Some(t.clone())));
        }
        assert_eq!(live.recorded().1, t);
    }

    #[tokio::test]
    async fn with_a_known_length_the_last_byte_waits_for_the_clean_end() {
        let live = Live::new(1, 1 << 20);
        live.set_head(head(), true);
        let mut first = live.first_reader(Some(6));
        live.push(Bytes::from_static(b"abc")).await;
        let got = first.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(&got[..], b"abc");
        live.push(Bytes::from_static(b"def")).await;
        // All but the last byte, at once.
        let got = first.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(&got[..], b"de");
        // The last byte waits for the end...
        let waiting =
            tokio::time::timeout(std::time::Duration::from_millis(50), first.frame()).await;
        assert!(waiting.is_err(), "the last byte went before the end");
        live.finish(Ok(()));
        let got = first.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(&got[..], b"f");
        assert!(first.frame().await.is_none());
        // ...and never goes when the end is a break.
        let live = Live::new(2, 1 << 20);
        live.set_head(head(), true);
        let reader = live.first_reader(Some(3));
        live.push(Bytes::from_static(b"xyz")).await;
        live.finish(Err("not stored".into()));
        let mut reader = reader;
        let got = reader.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(&got[..], b"xy");
        assert!(reader.frame().await.unwrap().is_err());
    }
}
