//! Plaintext HTTP/1.1 upstream connections driven by the task that uses
//! them.
//!
//! hyper-util's pooled client gives every connection a task of its own: a
//! request hands its message to that task and gets the response back
//! through a channel, two cross-task wake-ups per request on a busy
//! runtime. Here a request checks an idle connection out, polls it next to
//! its own response future, and the response body keeps polling it until
//! the body ends; the connection then goes back to the pool, idle and
//! unpolled. This is how pingora drives upstream connections. On this
//! project's machine it took a bare hyper proxy from 0.82× to 0.95× of
//! nginx, and idemgate's pass-through to about 8% less CPU per request
//! (benches/RESULTS.md).
//!
//! Only plaintext HTTP/1.1 takes this path: an h2 connection multiplexes
//! many requests and needs a task of its own, and TLS upstreams keep
//! hyper-util's client with its ALPN.
//!
//! What is known about a failed exchange is what hyper returns: a request
//! it hands back was never written (the connection was found closed), so
//! it is tried again on another connection; anything else may have reached
//! the upstream and is reported as such.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use http::{header, HeaderValue, Request, Response, Uri};
use http_body::{Body as _, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
// tokio's clock, so that tests can age idle connections on a paused one.
use tokio::time::Instant;

use crate::error::{error_chain, UpstreamError};
use crate::{Body, BoxError};

type Conn = http1::Connection<TokioIo<TcpStream>, Body>;

/// How often idle connections are checked for an upstream that closed them.
const REAP_EVERY: Duration = Duration::from_secs(1);

/// The pool of one upstream (cloning shares it).
#[derive(Clone)]
pub struct Pool(Arc<Shared>);

struct Shared {
    /// `host:port`, resolved at each connect (an IP literal needs no lookup).
    addr: String,
    /// The Host header sent when the request has none (HTTP/2 clients).
    host: HeaderValue,
    connect_timeout: Duration,
    /// `upstream_max_idle`: idle connections kept at most; the oldest is
    /// closed to make room.
    max_idle: usize,
    /// `upstream_idle_timeout`: how long a connection may sit idle.
    idle_timeout: Duration,
    /// One list per event loop (`event_loops`, `loops.rs`), each of at most
    /// `max_idle`: a connection registered with one loop's reactor is only
    /// used by that loop's requests.
    idle: Box<[Mutex<VecDeque<Idle>>]>,
    /// Whether the reaper task runs (started with the first idle return,
    /// since a pool can be built outside a runtime, by check-config).
    reaping: AtomicBool,
}

/// One upstream connection and what is polled and signalled with it.
struct Link {
    send: http1::SendRequest<Body>,
    /// Boxed: hyper's connection is most of a link's size (about 700
    /// bytes), and a link moves several times a request (out of the idle
    /// list, into the response body, back); boxed once per connection,
    /// each move is a pointer's.
    conn: Box<Conn>,
    ack: Ack,
    /// Made once per connection, so a request costs no allocation for it.
    turn: Arc<Turn>,
    waker: Waker,
}

struct Idle {
    link: Link,
    since: Instant,
}

/// A second handle on a connection's socket, to acknowledge at once what
/// has arrived. An upstream without `TCP_NODELAY` that writes a response's
/// head and body apart sends the body only once the head is acknowledged,
/// and Linux delays that ACK by 40 ms on a request/response connection:
/// measured, every such response took 44 ms on a reused connection. So
/// whenever a response body waits for more, the socket is put in quickack
/// mode (which also sends an ACK that was being held). A response that
/// arrives whole never waits, and costs nothing. Quick-ACK mode is
/// Linux's: elsewhere this is nothing, and no descriptor is duplicated.
#[cfg(target_os = "linux")]
struct Ack(std::net::TcpStream);
#[cfg(not(target_os = "linux"))]
struct Ack;

impl Ack {
    /// The second handle shares the socket (a duplicated descriptor); both
    /// close together, as they live and drop side by side.
    #[cfg(target_os = "linux")]
    fn of(stream: &std::net::TcpStream) -> std::io::Result<Ack> {
        stream.try_clone().map(Ack)
    }

    #[cfg(not(target_os = "linux"))]
    fn of(_: &std::net::TcpStream) -> std::io::Result<Ack> {
        Ok(Ack)
    }

    #[cfg(target_os = "linux")]
    fn now(&self) {
        let _ = socket2::SockRef::from(&self.0).set_tcp_quickack(true);
    }

    #[cfg(not(target_os = "linux"))]
    fn now(&self) {}
}

impl Idle {
    /// Still usable: not idle too long, not closed by the upstream (its EOF
    /// is read now; a noop waker is fine, since whoever uses it next polls
    /// it again with its own), and ready for a request.
    fn usable(&mut self, now: Instant, idle_timeout: Duration) -> bool {
        now.duration_since(self.since) < idle_timeout
            && poll_noop(&mut self.link.conn).is_pending()
            && self.link.send.is_ready()
    }
}

/// The waker the connection and the response are polled with, together, in
/// one task. hyper's channels between the two halves of a connection wake
/// the other half, which here is this same task: rescheduling it for that
/// (on tokio's multi-thread runtime a task that wakes itself also unparks an
/// idle worker to steal it) measured 5.1-5.6 context switches per request
/// at one connection, 3.8 with this. A wake that comes while they are being
/// polled only asks for one more turn of the polling loop (up to
/// [`MAX_TURNS`]); any other (the socket's) wakes the task.
struct Turn {
    polling: AtomicBool,
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Wake for Turn {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if self.polling.load(SeqCst) {
            self.woken.store(true, SeqCst);
            // The loop may have checked `woken` just before this store and
            // ended its turn: then the wake is the task's after all.
            if !self.polling.load(SeqCst) && self.woken.swap(false, SeqCst) {
                self.task.wake();
            }
        } else {
            self.task.wake();
        }
    }
}

/// Turns in one poll before a wake reschedules the task after all: tokio's
/// cooperative budget, once spent, makes every socket operation return
/// pending and wake the task at once, which only a real yield refills.
const MAX_TURNS: usize = 8;

/// Polls `step` with the turn waker until it is ready, or pending with no
/// wake during its turn.
fn turns<T>(
    turn: &Arc<Turn>,
    waker: &Waker,
    cx: &mut Context<'_>,
    mut step: impl FnMut(&mut Context<'_>) -> Poll<T>,
) -> Poll<T> {
    turn.task.register(cx.waker());
    let mut inner = Context::from_waker(waker);
    for _ in 0..MAX_TURNS {
        turn.polling.store(true, SeqCst);
        let out = step(&mut inner);
        turn.polling.store(false, SeqCst);
        if out.is_ready() || !turn.woken.swap(false, SeqCst) {
            return out;
        }
    }
    // Woken on the last turn: yield to the scheduler with the wake.
    cx.waker().wake_by_ref();
    Poll::Pending
}

fn poll_noop(conn: &mut Conn) -> Poll<hyper::Result<()>> {
    Pin::new(conn).poll(&mut Context::from_waker(Waker::noop()))
}

impl Pool {
    /// A pool for the upstream at `uri` (scheme `http`).
    pub fn new(
        uri: &Uri,
        connect_timeout: Duration,
        max_idle: usize,
        idle_timeout: Duration,
    ) -> Result<Self, String> {
        let host = uri.host().ok_or_else(|| format!("{uri} has no host"))?;
        let port = uri.port_u16().unwrap_or(80);
        let host_header = match uri.port_u16() {
            Some(p) if p != 80 => format!("{host}:{p}"),
            _ => host.to_string(),
        };
        Ok(Pool(Arc::new(Shared {
            // `uri.host()` keeps an IPv6 literal's brackets, as
            // `host:port` parsing wants them.
            addr: format!("{host}:{port}"),
            host: HeaderValue::from_str(&host_header).map_err(|e| e.to_string())?,
            connect_timeout,
            max_idle,
            idle_timeout,
            idle: (0..LISTS).map(|_| Mutex::new(VecDeque::new())).collect(),
            reaping: AtomicBool::new(false),
        })))
    }

    /// Sends `req` (its URI already in origin form) and returns the response
    /// whose body drives the connection to its end.
    pub async fn send(&self, mut req: Request<Body>) -> Result<Response<Body>, UpstreamError> {
        if !req.headers().contains_key(header::HOST) {
            req.headers_mut().insert(header::HOST, self.0.host.clone());
        }
        loop {
            let (reused, link) = match self.checkout() {
                Some(idle) => (true, idle.link),
                None => (false, self.connect().await?),
            };
            let Link {
                mut send,
                conn,
                ack,
                turn,
                waker,
            } = link;
            let mut resp = std::pin::pin!(send.try_send_request(req));
            let mut conn = Some(conn);
            let result = std::future::poll_fn(|cx| {
                turns(&turn, &waker, cx, |cx| {
                    // The connection first: it writes the request and reads
                    // the response head that the response future then finds.
                    if let Some(c) = conn.as_mut() {
                        if Pin::new(c).poll(cx).is_ready() {
                            // Ended: the response future reports why.
                            conn = None;
                        }
                    }
                    resp.as_mut().poll(cx)
                })
            })
            .await;
            match result {
                Ok(resp) => {
                    let (parts, body) = resp.into_parts();
                    let body = Driven {
                        body,
                        link: conn.map(|conn| Link {
                            send,
                            conn,
                            ack,
                            turn,
                            waker,
                        }),
                        pool: Arc::downgrade(&self.0),
                    };
                    return Ok(Response::from_parts(parts, Body::new(body)));
                }
                Err(mut e) => match e.take_message() {
                    // Not written: an idle connection the upstream had
                    // closed. Another one (or a new one) gets it.
                    Some(back) if reused => req = back,
                    Some(_) => {
                        return Err(UpstreamError::Unreachable(format!(
                            "the upstream closed a new connection before the request was sent: {}",
                            error_chain(e.error())
                        )))
                    }
                    None => return Err(UpstreamError::Failed(error_chain(e.error()))),
                },
            }
        }
    }

    /// Sends a request that asks to switch protocols on a connection of
    /// its own, driven by a task of its own until the upgrade takes it
    /// (or the upstream answers otherwise and it closes): the response's
    /// `hyper::upgrade::on` then yields the connection.
    pub async fn upgrade(&self, mut req: Request<Body>) -> Result<Response<Body>, UpstreamError> {
        if !req.headers().contains_key(header::HOST) {
            req.headers_mut().insert(header::HOST, self.0.host.clone());
        }
        let Link { mut send, conn, .. } = self.connect().await?;
        tokio::spawn(async move {
            if let Err(e) = (*conn).with_upgrades().await {
                tracing::debug!(error = %e, "upstream upgrade connection ended with an error");
            }
        });
        match send.send_request(req).await {
            Ok(resp) => Ok(resp.map(|b| b.map_err(Into::into).boxed())),
            Err(e) => Err(UpstreamError::Failed(error_chain(&e))),
        }
    }

    /// The most recently used idle connection still usable (LIFO keeps the
    /// warm ones busy and lets the rest age out).
    fn checkout(&self) -> Option<Idle> {
        let now = Instant::now();
        let mut stale = Vec::new();
        let found = {
            let mut idle = self.0.idle().lock().unwrap_or_else(|p| p.into_inner());
            loop {
                let Some(mut i) = idle.pop_back() else {
                    break None;
                };
                if i.usable(now, self.0.idle_timeout) {
                    break Some(i);
                }
                stale.push(i);
            }
        };
        // Closed outside the lock.
        drop(stale);
        found
    }

    async fn connect(&self) -> Result<Link, UpstreamError> {
        let unreachable = |e: std::io::Error| {
            UpstreamError::Unreachable(format!("tcp connect error: {e} ({})", self.0.addr))
        };
        let stream =
            match tokio::time::timeout(self.0.connect_timeout, TcpStream::connect(&self.0.addr))
                .await
            {
                Err(_) => {
                    return Err(unreachable(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "connect timed out",
                    )))
                }
                Ok(r) => r.map_err(unreachable)?,
            };
        stream.set_nodelay(true).map_err(unreachable)?;
        let keepalive = socket2::TcpKeepalive::new().with_time(Duration::from_secs(60));
        socket2::SockRef::from(&stream)
            .set_tcp_keepalive(&keepalive)
            .map_err(unreachable)?;
        let std = stream.into_std().map_err(unreachable)?;
        let ack = Ack::of(&std).map_err(unreachable)?;
        let stream = TcpStream::from_std(std).map_err(unreachable)?;
        let (send, conn) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| UpstreamError::Unreachable(error_chain(&e)))?;
        let turn = Arc::new(Turn {
            polling: AtomicBool::new(false),
            woken: AtomicBool::new(false),
            task: AtomicWaker::new(),
        });
        let waker = Waker::from(turn.clone());
        Ok(Link {
            send,
            conn: Box::new(conn),
            ack,
            turn,
            waker,
        })
    }
}

/// Idle lists per pool: list 0 for threads that are no event loop, and one
/// per loop, loops past the 15th sharing them in turn.
const LISTS: usize = 16;

impl Shared {
    /// This thread's idle list.
    fn idle(&self) -> &Mutex<VecDeque<Idle>> {
        let n = crate::store::event_loop::current();
        // List 0 off the loops; loops past the 15th share lists in turn.
        &self.idle[if n == 0 { 0 } else { 1 + (n - 1) % (LISTS - 1) }]
    }

    fn checkin(self: &Arc<Self>, mut link: Link) {
        // An idle connection must not keep the task that used it alive, nor
        // wake it: whoever checks it out registers its own.
        drop(link.turn.task.take());
        // The last poll lets the connection see its response through and
        // turn idle; one that did not (or was closed) cannot be reused.
        if self.max_idle == 0 || poll_noop(&mut link.conn).is_ready() || !link.send.is_ready() {
            return;
        }
        let evicted = {
            let mut idle = self.idle().lock().unwrap_or_else(|p| p.into_inner());
            idle.push_back(Idle {
                link,
                since: Instant::now(),
            });
            (idle.len() > self.max_idle).then(|| idle.pop_front())
        };
        drop(evicted);
        if !self.reaping.swap(true, SeqCst) {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(reap(Arc::downgrade(self)));
            }
        }
    }
}

/// Closes idle connections that aged out or that the upstream closed, so
/// none lingers half-closed while traffic is low. Ends with the pool.
async fn reap(pool: Weak<Shared>) {
    let mut tick = tokio::time::interval(REAP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(pool) = pool.upgrade() else { return };
        let now = Instant::now();
        let mut stale: Vec<Idle> = Vec::new();
        for list in &pool.idle {
            let mut idle = list.lock().unwrap_or_else(|p| p.into_inner());
            let mut kept = VecDeque::with_capacity(idle.len());
            for mut i in idle.drain(..) {
                if i.usable(now, pool.idle_timeout) {
                    kept.push_back(i);
                } else {
                    stale.push(i);
                }
            }
            *idle = kept;
        }
        drop(stale);
    }
}

/// A response body that drives its connection: each poll first lets the
/// connection read, then takes what it delivered. At the end the connection
/// goes back to the pool; dropped before the end, it is closed (an HTTP/1.1
/// connection cannot be reused mid-response).
struct Driven {
    body: Incoming,
    /// `None` once the connection ended (or went back to the pool).
    link: Option<Link>,
    pool: Weak<Shared>,
}

impl Driven {
    fn release(&mut self) {
        if let (Some(link), Some(pool)) = (self.link.take(), self.pool.upgrade()) {
            pool.checkin(link);
        }
    }
}

impl http_body::Body for Driven {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let body = &mut this.body;
        let frame = match &mut this.link {
            Some(Link {
                conn, turn, waker, ..
            }) => {
                let mut ended = false;
                let frame = turns(turn, waker, cx, |cx| {
                    if !ended && Pin::new(&mut *conn).poll(cx).is_ready() {
                        ended = true;
                    }
                    Pin::new(&mut *body).poll_frame(cx)
                });
                if ended {
                    this.link = None;
                }
                frame
            }
            // The connection ended: what it delivered is in the body.
            None => Pin::new(body).poll_frame(cx),
        };
        match frame {
            Poll::Pending => {
                if let Some(link) = &this.link {
                    link.ack.now();
                }
                Poll::Pending
            }
            Poll::Ready(Some(Err(e))) => {
                // A broken connection is not reused.
                this.link = None;
                Poll::Ready(Some(Err(e.into())))
            }
            frame => {
                if matches!(frame, Poll::Ready(None))
                    || (frame.is_ready() && this.body.is_end_stream())
                {
                    this.release();
                }
                frame.map_err(Into::into)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for Driven {
    fn drop(&mut self) {
        // An empty body (HEAD, 204, 304) or one read to its end whose last
        // poll came before the end was known: the connection is reusable.
        if self.body.is_end_stream() {
            self.release();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::atomic::AtomicUsize;

    use http_body_util::{BodyExt, Empty, Full};
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    use super::*;

    /// A waker that counts its wakes.
    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, SeqCst);
        }
    }

    fn turn() -> (Arc<Turn>, Waker) {
        let turn = Arc::new(Turn {
            polling: AtomicBool::new(false),
            woken: AtomicBool::new(false),
            task: AtomicWaker::new(),
        });
        let waker = Waker::from(turn.clone());
        (turn, waker)
    }

    fn task() -> (Arc<Count>, Waker) {
        let count = Arc::new(Count(AtomicUsize::new(0)));
        (count.clone(), Waker::from(count))
    }

    #[test]
    fn a_wake_during_the_turn_is_another_turn_not_a_task_wake() {
        let (turn, waker) = turn();
        let (woken, task) = task();
        let mut steps = 0;
        let out = turns(&turn, &waker, &mut Context::from_waker(&task), |cx| {
            steps += 1;
            if steps == 1 {
                cx.waker().wake_by_ref();
                Poll::Pending
            } else {
                Poll::Ready(steps)
            }
        });
        assert_eq!(out, Poll::Ready(2));
        assert_eq!(woken.0.load(SeqCst), 0, "the task was not rescheduled");
    }

    #[test]
    fn a_wake_from_another_thread_wakes_the_task() {
        let (turn, waker) = turn();
        let (woken, task) = task();
        let out: Poll<()> = turns(&turn, &waker, &mut Context::from_waker(&task), |_| {
            Poll::Pending
        });
        assert!(out.is_pending());
        std::thread::spawn(move || waker.wake()).join().unwrap();
        assert_eq!(woken.0.load(SeqCst), 1);
    }

    #[test]
    fn a_step_that_always_wakes_itself_yields_after_the_turn_limit() {
        let (turn, waker) = turn();
        let (woken, task) = task();
        let mut steps = 0;
        let out: Poll<()> = turns(&turn, &waker, &mut Context::from_waker(&task), |cx| {
            steps += 1;
            cx.waker().wake_by_ref();
            Poll::Pending
        });
        assert!(out.is_pending());
        assert_eq!(steps, MAX_TURNS);
        assert_eq!(woken.0.load(SeqCst), 1, "yielded with a wake");
    }

    /// An HTTP/1.1 upstream on a free port that answers `ok` and counts
    /// the connections it accepted.
    async fn upstream() -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let conns = Arc::new(AtomicUsize::new(0));
        let counted = conns.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                counted.fetch_add(1, SeqCst);
                let svc = hyper::service::service_fn(|_req| async {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc),
                );
            }
        });
        (addr, conns)
    }

    type SocketAddr = std::net::SocketAddr;

    fn pool(addr: SocketAddr, max_idle: usize, idle_timeout: Duration) -> Pool {
        let uri: Uri = format!("http://{addr}/").parse().unwrap();
        Pool::new(&uri, Duration::from_secs(2), max_idle, idle_timeout).unwrap()
    }

    fn get() -> Request<Body> {
        let mut req = Request::new(Empty::new().map_err(|never| match never {}).boxed());
        *req.uri_mut() = Uri::from_static("/");
        req
    }

    async fn read(resp: Response<Body>) -> Bytes {
        resp.into_body().collect().await.unwrap().to_bytes()
    }

    fn idle(p: &Pool) -> usize {
        p.0.idle().lock().unwrap().len()
    }

    #[tokio::test]
    async fn past_max_idle_the_oldest_idle_connection_is_closed() {
        let (addr, conns) = upstream().await;
        let p = pool(addr, 2, Duration::from_secs(60));
        // Three at once: three connections, all returned when read.
        let (a, b, c) = tokio::join!(p.send(get()), p.send(get()), p.send(get()));
        for r in [a, b, c] {
            assert_eq!(read(r.unwrap()).await, "ok");
        }
        assert_eq!(conns.load(SeqCst), 3);
        assert_eq!(idle(&p), 2, "one closed to stay within upstream_max_idle");
        // The two kept are reused.
        for _ in 0..4 {
            assert_eq!(read(p.send(get()).await.unwrap()).await, "ok");
        }
        assert_eq!(conns.load(SeqCst), 3);
    }

    #[tokio::test]
    async fn no_connection_is_kept_with_max_idle_zero() {
        let (addr, conns) = upstream().await;
        let p = pool(addr, 0, Duration::from_secs(60));
        for _ in 0..3 {
            assert_eq!(read(p.send(get()).await.unwrap()).await, "ok");
            assert_eq!(idle(&p), 0);
        }
        assert_eq!(conns.load(SeqCst), 3);
    }

    #[tokio::test]
    async fn a_connection_idle_past_the_idle_timeout_is_not_reused() {
        let (addr, conns) = upstream().await;
        let p = pool(addr, 8, Duration::from_secs(30));
        assert_eq!(read(p.send(get()).await.unwrap()).await, "ok");
        assert_eq!(idle(&p), 1);
        // Not yet: still reused.
        tokio::time::pause();
        tokio::time::advance(Duration::from_secs(29)).await;
        {
            let mut idle = p.0.idle().lock().unwrap();
            assert!(idle[0].usable(Instant::now(), p.0.idle_timeout));
        }
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(p.checkout().is_none(), "aged out");
        assert_eq!(idle(&p), 0, "and closed");
        tokio::time::resume();
        assert_eq!(read(p.send(get()).await.unwrap()).await, "ok");
        assert_eq!(conns.load(SeqCst), 2);
    }

    #[tokio::test]
    async fn a_connection_left_idle_holds_no_task_waker() {
        let (addr, _) = upstream().await;
        let p = pool(addr, 8, Duration::from_secs(60));
        assert_eq!(read(p.send(get()).await.unwrap()).await, "ok");
        let idle = p.checkout().unwrap();
        assert!(idle.link.turn.task.take().is_none());
    }

    #[tokio::test]
    async fn a_request_cancelled_before_its_head_never_returns_its_connection() {
        // An upstream that reads the request and never answers.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let mut seen = 0;
            // Read until the client closes: the number of bytes it sent.
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return seen,
                    Ok(n) => seen += n,
                }
            }
        });
        let p = pool(addr, 8, Duration::from_secs(60));
        let timed = tokio::time::timeout(Duration::from_millis(200), p.send(get())).await;
        assert!(timed.is_err(), "no head arrived");
        assert_eq!(idle(&p), 0, "the connection went nowhere but closed");
        let seen = tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("the connection was closed")
            .unwrap();
        assert!(seen > 0, "the request was written before it was cancelled");
    }
}
