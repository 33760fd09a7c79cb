//! OpenTelemetry traces against a real OTLP/HTTP receiver that decodes
//! the protobuf export (`opentelemetry-proto`'s own types), with idemgate
//! as a process (tracing is process-wide): the spans of a first request, a
//! replay and a concurrent duplicate, their parents and attributes, the
//! replay's link to the request that ran, `traceparent` reaching the
//! upstream, the sampler, and a receiver that is down or failing changing
//! no response.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use support::proc::Proc;
use support::{serve_http1, TestClient, TestUpstream};

/// An OTLP/HTTP receiver: keeps every span it is sent and answers with
/// the status it is set to (200 by default).
#[derive(Clone)]
struct Receiver {
    addr: SocketAddr,
    spans: Arc<Mutex<Vec<Span>>>,
    resource: Arc<Mutex<Vec<(String, String)>>>,
    status: Arc<AtomicU16>,
}

impl Receiver {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let r = Receiver {
            addr: listener.local_addr().unwrap(),
            spans: Arc::default(),
            resource: Arc::default(),
            status: Arc::new(AtomicU16::new(200)),
        };
        let me = r.clone();
        serve_http1(listener, move |req: Request<Incoming>| {
            let me = me.clone();
            async move {
                assert_eq!(req.uri().path(), "/v1/traces");
                assert_eq!(req.headers()["content-type"], "application/x-protobuf");
                let body = req.into_body().collect().await.unwrap().to_bytes();
                let status = me.status.load(Ordering::Relaxed);
                if status == 200 {
                    let export = ExportTraceServiceRequest::decode(body).unwrap();
                    for rs in export.resource_spans {
                        if let Some(res) = rs.resource {
                            let mut kept = me.resource.lock().unwrap();
                            for kv in res.attributes {
                                kept.push((kv.key.clone(), text(kv.value.and_then(|v| v.value))));
                            }
                        }
                        for ss in rs.scope_spans {
                            me.spans.lock().unwrap().extend(ss.spans);
                        }
                    }
                }
                Ok::<_, Infallible>(
                    Response::builder()
                        .status(status)
                        .body(Full::new(Bytes::new()))
                        .unwrap(),
                )
            }
        });
        r
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn spans(&self) -> Vec<Span> {
        self.spans.lock().unwrap().clone()
    }

    /// Waits until `want` says the spans are all in (or fails after 10 s).
    async fn until(&self, what: &str, want: impl Fn(&[Span]) -> bool) -> Vec<Span> {
        let started = Instant::now();
        loop {
            let spans = self.spans();
            if want(&spans) {
                return spans;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "{what}: never arrived; got {:#?}",
                spans.iter().map(|s| &s.name).collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn text(v: Option<Value>) -> String {
    match v {
        Some(Value::StringValue(s)) => s,
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

fn attr(s: &Span, key: &str) -> Option<String> {
    s.attributes
        .iter()
        .find(|kv| kv.key == key)
        .map(|kv| text(kv.value.clone().and_then(|v| v.value)))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn kind(s: &Span) -> SpanKind {
    SpanKind::try_from(s.kind).unwrap()
}

/// A config file for idemgate with `[tracing]` sending to `receiver`.
fn config_file(tracing: &str) -> tempfile_path::Path {
    tempfile_path::write(&format!(
        "[[routes]]\npath = \"/v1/payments/*\"\n\n[tracing]\n{tracing}\n"
    ))
}

/// A small temporary file, removed when dropped.
mod tempfile_path {
    pub struct Path(pub std::path::PathBuf);

    impl Drop for Path {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    pub fn write(text: &str) -> Path {
        let p = std::env::temp_dir().join(format!(
            "idemgate-traces-{}-{}.toml",
            std::process::id(),
            super::support::unique("cfg")
        ));
        std::fs::write(&p, text).unwrap();
        Path(p)
    }
}

const CLIENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

async fn metric(admin: SocketAddr, name: &str) -> f64 {
    let c = TestClient::new(admin);
    let got = c.send("GET", "/metrics", &[], "").await;
    String::from_utf8_lossy(&got.body)
        .lines()
        .find_map(|l| l.strip_prefix(name).map(|v| v.trim().parse().unwrap()))
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_request_a_replay_and_a_duplicate_make_the_spans_with_their_parents_and_link() {
    let receiver = Receiver::start().await;
    let up = TestUpstream::start().await;
    let file = config_file(&format!(
        "endpoint = \"{}\"\nservice_name = \"payments-edge\"\n\
         resource_attributes = {{ \"deployment.environment\" = \"test\" }}",
        receiver.url()
    ));
    let p = Proc::start(
        &up.url(),
        &["--config", file.0.to_str().unwrap()],
        &[("RUST_LOG", "info,idemgate::proxy::service=debug")],
    )
    .await;
    let c = TestClient::new(p.proxy);
    let traceparent = format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01");
    let first = c
        .send(
            "POST",
            "/v1/payments/p1",
            &[
                ("idempotency-key", "order-1"),
                ("traceparent", &traceparent),
                ("baggage", "tenant=acme"),
            ],
            "{}",
        )
        .await;
    assert_eq!(first.status, 201);

    // The upstream got idemgate's client span as parent, the client's
    // trace, and the baggage.
    let seen = up.seen();
    let sent = seen[0].headers["traceparent"].to_str().unwrap().to_owned();
    let parts: Vec<&str> = sent.split('-').collect();
    assert_eq!(parts[1], CLIENT_TRACE, "{sent}");
    assert_ne!(parts[2], CLIENT_SPAN, "idemgate's span is the parent");
    assert_eq!(seen[0].headers["baggage"], "tenant=acme");

    let spans = receiver
        .until("the first request's spans", |s| {
            s.iter().any(|x| kind(x) == SpanKind::Server)
                && s.iter()
                    .any(|x| x.name == "POST" && kind(x) == SpanKind::Client)
        })
        .await;
    let server = spans.iter().find(|s| kind(s) == SpanKind::Server).unwrap();
    assert_eq!(hex(&server.trace_id), CLIENT_TRACE);
    assert_eq!(hex(&server.parent_span_id), CLIENT_SPAN);
    assert_eq!(server.name, "POST /v1/payments/*");
    assert_eq!(attr(server, "http.request.method").unwrap(), "POST");
    assert_eq!(attr(server, "http.route").unwrap(), "/v1/payments/*");
    assert_eq!(attr(server, "http.response.status_code").unwrap(), "201");
    assert_eq!(attr(server, "idemgate.outcome").unwrap(), "forwarded");
    assert_eq!(attr(server, "idemgate.replayed").unwrap(), "false");
    let record = attr(server, "idemgate.record").unwrap();
    assert_eq!(record.len(), 64, "the record's hash, not the key");
    assert!(!record.contains("order-1"));
    assert!(attr(server, "idemgate.fence")
        .unwrap()
        .parse::<u64>()
        .is_ok());
    // Children of the server span: the store's begin and complete, and
    // the upstream call, whose id the upstream got.
    let children: Vec<&Span> = spans
        .iter()
        .filter(|s| s.parent_span_id == server.span_id)
        .collect();
    let store_ops: Vec<String> = children
        .iter()
        .filter(|s| attr(s, "db.system.name").as_deref() == Some("memory"))
        .map(|s| attr(s, "db.operation.name").unwrap())
        .collect();
    assert!(store_ops.contains(&"begin".to_owned()), "{store_ops:?}");
    assert!(store_ops.contains(&"complete".to_owned()), "{store_ops:?}");
    let call = children
        .iter()
        .find(|s| kind(s) == SpanKind::Client && attr(s, "server.address").is_some())
        .expect("the upstream call's span");
    assert_eq!(hex(&call.span_id), parts[2]);
    assert_eq!(attr(call, "server.address").unwrap(), "127.0.0.1");
    assert_eq!(
        attr(call, "server.port").unwrap(),
        up.addr.port().to_string()
    );
    assert_eq!(attr(call, "http.response.status_code").unwrap(), "201");

    // A retry in a trace of its own: replayed, and linked to the request
    // that ran.
    let again = c
        .send(
            "POST",
            "/v1/payments/p1",
            &[("idempotency-key", "order-1")],
            "{}",
        )
        .await;
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    let spans = receiver
        .until("the replay's span", |s| {
            s.iter().filter(|x| kind(x) == SpanKind::Server).count() >= 2
        })
        .await;
    let replay = spans
        .iter()
        .find(|s| {
            kind(s) == SpanKind::Server && attr(s, "idemgate.replayed").as_deref() == Some("true")
        })
        .unwrap();
    assert_ne!(hex(&replay.trace_id), CLIENT_TRACE, "a trace of its own");
    assert_eq!(attr(replay, "idemgate.outcome").unwrap(), "replayed");
    assert_eq!(attr(replay, "idemgate.record").unwrap(), record);
    assert_eq!(replay.links.len(), 1, "the link to the request that ran");
    assert_eq!(hex(&replay.links[0].trace_id), CLIENT_TRACE);
    assert_eq!(replay.links[0].span_id, server.span_id);
    // Nothing went upstream for it.
    assert_eq!(up.calls(), 1);

    // A concurrent duplicate waits (its wait span says how it ended) and
    // its replay links to the original too.
    let slow = {
        let c = c.clone();
        tokio::spawn(async move {
            c.send(
                "POST",
                "/v1/payments/p2",
                &[("idempotency-key", "order-2"), ("x-delay-ms", "400")],
                "{}",
            )
            .await
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let dup = c
        .send(
            "POST",
            "/v1/payments/p2",
            &[("idempotency-key", "order-2"), ("x-delay-ms", "400")],
            "{}",
        )
        .await;
    let original = slow.await.unwrap();
    assert_eq!(original.status, 201);
    assert_eq!(dup.status, 201);
    assert_eq!(dup.header("idempotent-replayed"), Some("true"));
    let spans = receiver
        .until("the duplicate's wait", |s| {
            s.iter().any(|x| x.name == "wait for duplicate")
                && s.iter().filter(|x| kind(x) == SpanKind::Server).count() >= 4
        })
        .await;
    let wait = spans
        .iter()
        .find(|s| s.name == "wait for duplicate")
        .unwrap();
    let how = attr(wait, "idemgate.wait").unwrap();
    assert!(how == "joined live" || how == "woken", "{how}");
    let servers = |outcome: &str| -> Vec<&Span> {
        spans
            .iter()
            .filter(|s| kind(s) == SpanKind::Server && s.trace_id != server.trace_id)
            .filter(|s| attr(s, "idemgate.record").as_deref() != Some(record.as_str()))
            .filter(|s| attr(s, "idemgate.outcome").as_deref() == Some(outcome))
            .collect()
    };
    let (ran, joined) = (servers("forwarded"), servers("replayed"));
    assert_eq!((ran.len(), joined.len()), (1, 1));
    // The wait is the duplicate's, and it links to the request that ran.
    assert_eq!(wait.parent_span_id, joined[0].span_id);
    assert_eq!(joined[0].links.len(), 1, "{how}: no link to the original");
    assert_eq!(joined[0].links[0].span_id, ran[0].span_id);
    assert_eq!(joined[0].links[0].trace_id, ran[0].trace_id);
    // Resource: the service's name and the attributes given.
    let resource = receiver.resource.lock().unwrap().clone();
    assert!(resource.contains(&("service.name".into(), "payments-edge".into())));
    assert!(resource.contains(&("deployment.environment".into(), "test".into())));
    // Log lines inside a request carry its trace and span ids.
    p.signal("-TERM");
    let (code, log) = p.finish();
    assert_eq!(code, Some(0), "{log}");
    let line = log
        .lines()
        .find(|l| l.contains(&format!("trace_id={CLIENT_TRACE}")))
        .unwrap_or_else(|| panic!("no log line with the trace id: {log}"));
    assert!(
        line.contains(&format!("span_id={}", hex(&server.span_id))),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sampler_follows_the_parent_and_the_ratio() {
    let receiver = Receiver::start().await;
    let up = TestUpstream::start().await;
    // parentbased_traceidratio at 0: a root request is never sampled; a
    // sampled parent's child always is.
    let p = Proc::start(
        &up.url(),
        &[],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &receiver.url()),
            ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "0"),
        ],
    )
    .await;
    let c = TestClient::new(p.proxy);
    for i in 0..20 {
        let got = c.post("/v1/x", &format!("root-{i}"), "{}").await;
        assert_eq!(got.status, 201);
        // Not sampled: the upstream still gets a (not sampled) context.
        let seen = up.seen();
        let tp = seen[i].headers["traceparent"].to_str().unwrap().to_owned();
        assert!(tp.ends_with("-00"), "{tp}");
    }
    // A parent that was not sampled: its decision goes on, in its trace.
    let unsampled = "00-11111111111111111111111111111111-2222222222222222-00";
    let got = c
        .send(
            "POST",
            "/v1/x",
            &[("idempotency-key", "unsampled"), ("traceparent", unsampled)],
            "{}",
        )
        .await;
    assert_eq!(got.status, 201);
    let tp = up.seen()[20].headers["traceparent"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        tp.starts_with("00-11111111111111111111111111111111-") && tp.ends_with("-00"),
        "{tp}"
    );
    assert!(
        !tp.contains("2222222222222222"),
        "a span id of idemgate's: {tp}"
    );
    let traceparent = format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01");
    let got = c
        .send(
            "POST",
            "/v1/x",
            &[("idempotency-key", "child"), ("traceparent", &traceparent)],
            "{}",
        )
        .await;
    assert_eq!(got.status, 201);
    let spans = receiver
        .until("the sampled child's spans", |s| {
            s.iter().any(|x| kind(x) == SpanKind::Server)
        })
        .await;
    // Give stray root spans time to arrive, then count.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let spans = receiver.spans().len().max(spans.len());
    let all = receiver.spans();
    assert!(
        all.iter().all(|s| hex(&s.trace_id) == CLIENT_TRACE),
        "only the sampled parent's trace is exported ({spans} spans)"
    );
    drop(p);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_down_slow_or_failing_changes_no_response_and_counts_what_it_drops() {
    let receiver = Receiver::start().await;
    receiver.status.store(500, Ordering::Relaxed);
    let down = support::proc::free_port();
    let up = TestUpstream::start().await;
    for (endpoint, timeout) in [
        (receiver.url(), "1000"),
        (format!("http://127.0.0.1:{down}"), "1000"),
        // A receiver that takes the connection and never answers.
        (slow_receiver().await, "300"),
    ] {
        let p = Proc::start(
            &up.url(),
            &[],
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
                ("OTEL_EXPORTER_OTLP_TIMEOUT", timeout),
            ],
        )
        .await;
        let c = TestClient::new(p.proxy);
        for i in 0..30 {
            let key = support::unique("drop");
            let got = c.post("/v1/x", &key, "{}").await;
            assert_eq!(got.status, 201, "{endpoint} request {i}");
            let again = c.post("/v1/x", &key, "{}").await;
            assert_eq!(again.header("idempotent-replayed"), Some("true"));
        }
        let started = Instant::now();
        loop {
            let dropped = metric(p.admin, "idemgate_trace_spans_dropped_total").await;
            if dropped > 0.0 {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "{endpoint}: no span counted as dropped"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        drop(p);
    }
}

/// Accepts connections and reads, but never answers.
async fn slow_receiver() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 1 << 16];
                use tokio::io::AsyncReadExt;
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                }
            });
        }
    });
    format!("http://{addr}")
}

#[test]
fn check_config_shows_tracing_with_the_file_over_the_environment() {
    let file = config_file(
        "endpoint = \"https://collector.example:4318/v1/traces\"\nsampler = \"traceidratio\"\n\
         sampler_arg = 0.1\nheaders = { \"x-api-key\" = \"s3cret\" }",
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_idemgate"))
        .args(["check-config", "--config", file.0.to_str().unwrap()])
        .env("OTEL_SERVICE_NAME", "from-env")
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", "http://ignored:4318")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("[tracing]"), "{text}");
    assert!(
        text.contains("endpoint = \"https://collector.example:4318/v1/traces\""),
        "{text}"
    );
    assert!(text.contains("service_name = \"from-env\""), "{text}");
    assert!(text.contains("sampler = \"traceidratio\""), "{text}");
    assert!(!text.contains("s3cret"), "{text}");
    // A bad value is exit 2, named.
    let bad = config_file("sampler = \"sometimes\"");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_idemgate"))
        .args(["check-config", "--config", bad.0.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("tracing.sampler"));
}

#[test]
fn the_readmes_tracing_example_loads() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let section = &readme[readme.find("## Tracing").unwrap()..];
    let start = section.find("```toml\n").unwrap() + "```toml\n".len();
    let example = &section[start..start + section[start..].find("```").unwrap()];
    assert!(example.contains("[tracing]"));
    let file = tempfile_path::write(example);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_idemgate"))
        .args(["check-config", "--config", file.0.to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("endpoint = \"http://otel-collector:4318/v1/traces\""),
        "{text}"
    );
    assert!(text.contains("sampler_arg = 0.1"), "{text}");
}
