//! A real SDK's own retries meet idemgate's retry hints: openai-python
//! (Stainless-generated, as are anthropic's and others) retries every 409
//! unless `x-should-retry` says otherwise. On an unknown outcome idemgate
//! says it cannot help, so the SDK stops after the first 409 instead of
//! spending its retries on an answer that cannot change.
//!
//! The SDK lives in a venv under `target/` that `scripts/test.sh` makes.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use support::{start, TestUpstream};

fn python() -> PathBuf {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/venv/bin/python");
    assert!(
        venv.is_file(),
        "{} is missing: run the tests through scripts/test.sh, which makes it",
        venv.display()
    );
    venv
}

/// Runs one SDK call; returns what it printed.
fn sdk_call(base: &str, key: &str, max_retries: u32) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sdk/openai_call.py");
    let out = Command::new(python())
        .arg(script)
        .args([base, key, &max_retries.to_string()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_python_stops_at_the_first_409_of_an_unknown_outcome() {
    let up = TestUpstream::start().await;
    // The upstream takes 1.5 s; idemgate gives it 300 ms: the first call
    // times out after it was sent, so its outcome is unknown.
    let (r, _) = start(&up, "upstream_timeout = \"300ms\"\n").await;
    let base = format!("http://{}/v1", r.proxy_addr.unwrap());
    let unknown = || {
        r.metrics
            .requests
            .with_label_values(&["outcome_unknown"])
            .get()
    };
    let b = base.clone();
    let first = tokio::task::spawn_blocking(move || sdk_call(&b, "sdk-1", 0))
        .await
        .unwrap();
    assert_eq!(first, "504");
    assert_eq!(up.calls(), 1);
    // The application retries with the same key, the SDK allowed 2 retries
    // of its own: one request reaches idemgate, the SDK gives up on it.
    let again = tokio::task::spawn_blocking(move || sdk_call(&base, "sdk-1", 2))
        .await
        .unwrap();
    assert_eq!(again, "409");
    assert_eq!(unknown(), 1, "the SDK retried a 409 that cannot change");
    assert_eq!(up.calls(), 1);
    r.stop().await;
}
