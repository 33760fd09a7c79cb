//! The binary: flags, environment, config file precedence, and clear exit-2
//! errors instead of panics.

use std::io::Write;
use std::process::{Command, Output};

fn idemgate(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_idemgate"));
    cmd.args(args);
    // Start from a clean slate whatever the caller's environment holds.
    for (k, _) in std::env::vars() {
        if k.starts_with("IDEMGATE_") {
            cmd.env_remove(k);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn file(text: &str) -> tempfile_lite::File {
    tempfile_lite::File::new(text)
}

/// A tiny temp-file helper (no extra dependency for one use).
mod tempfile_lite {
    pub struct File(pub std::path::PathBuf);
    impl File {
        pub fn new(text: &str) -> Self {
            use std::sync::atomic::{AtomicU32, Ordering};
            static N: AtomicU32 = AtomicU32::new(0);
            let p = std::env::temp_dir().join(format!(
                "idemgate-test-{}-{}.toml",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let mut f = std::fs::File::create(&p).unwrap();
            super::Write::write_all(&mut f, text.as_bytes()).unwrap();
            File(p)
        }
        pub fn path(&self) -> &str {
            self.0.to_str().unwrap()
        }
    }
    impl Drop for File {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn a_bad_flag_value_is_one_line_and_exit_2() {
    let o = idemgate(&["--listen", "bogus"], &[]);
    assert_eq!(o.status.code(), Some(2));
    let err = stderr(&o);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("--listen") && err.contains("\"bogus\""),
        "{err}"
    );
    assert!(!err.contains("panicked"));
}

#[test]
fn a_bad_env_value_names_the_variable() {
    let o = idemgate(&[], &[("IDEMGATE_UPSTREAM", "ftp://nope")]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("IDEMGATE_UPSTREAM"), "{}", stderr(&o));
}

#[test]
fn an_unknown_flag_is_exit_2() {
    let o = idemgate(&["--no-such-flag"], &[]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn a_missing_or_broken_file_is_exit_2() {
    let o = idemgate(&["--config", "/nonexistent/idemgate.toml"], &[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("cannot read"));
    let f = file("[idempotency\n");
    let o = idemgate(&["--config", f.path()], &[]);
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(stderr(&o).lines().count(), 1, "{}", stderr(&o));
}

#[test]
fn check_config_lists_every_problem_with_its_path() {
    let f = file("[idempotency]\nrecord_ttl = \"forever\"\nlease_ttl = 5\n[store]\non_store_error = \"shrug\"\n");
    let o = idemgate(&["check-config", "--config", f.path()], &[]);
    assert_eq!(o.status.code(), Some(2));
    let err = stderr(&o);
    assert!(
        err.contains("idempotency.record_ttl: \"forever\" is not a duration"),
        "{err}"
    );
    assert!(
        err.contains("idempotency.lease_ttl: 5 is not a duration"),
        "{err}"
    );
    assert!(err.contains("store.on_store_error: \"shrug\""), "{err}");
    assert_eq!(err.lines().count(), 3, "{err}");
}

#[test]
fn check_config_accepts_the_example_and_prints_the_effective_config() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/config/idemgate.example.toml");
    let o = idemgate(&["check-config", "--config", example], &[]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("record_ttl = \"1day\""), "{out}");
    assert!(out.contains("path = \"/v1/payments/**\""), "{out}");
    assert!(out.contains("record_ttl = \"2days\""), "{out}");
}

#[test]
fn precedence_is_flag_then_env_then_file() {
    let f = file("listen = \"127.0.0.1:1111\"\n");
    let show = |args: &[&str], env: &[(&str, &str)]| {
        let mut all = args.to_vec();
        all.extend(["check-config", "--config", f.path()]);
        let o = idemgate(&all, env);
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
        stdout(&o).lines().next().unwrap().to_owned()
    };
    assert_eq!(show(&[], &[]), "listen = \"127.0.0.1:1111\"");
    assert_eq!(
        show(&[], &[("IDEMGATE_LISTEN", "127.0.0.1:2222")]),
        "listen = \"127.0.0.1:2222\""
    );
    assert_eq!(
        show(
            &["--listen", "127.0.0.1:3333"],
            &[("IDEMGATE_LISTEN", "127.0.0.1:2222")]
        ),
        "listen = \"127.0.0.1:3333\""
    );
    // The config file itself can come from the environment.
    let o = idemgate(&["check-config"], &[("IDEMGATE_CONFIG", f.path())]);
    assert_eq!(o.status.code(), Some(0));
}

#[test]
fn check_config_needs_a_file() {
    let o = idemgate(&["check-config"], &[]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn redis_passwords_are_not_printed() {
    let f = file("[store]\nbackend = \"redis\"\nurls = [\"redis://app:hunter2@127.0.0.1:6379\"]\n");
    let o = idemgate(&["check-config", "--config", f.path()], &[]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(!stdout(&o).contains("hunter2"));
}

#[test]
fn a_missing_webhook_secret_is_exit_2_naming_it_and_never_printed() {
    let f = file(
        "upstream = \"http://127.0.0.1:1\"\n[[routes]]\npath = \"/hooks/gh\"\npreset = \"github\"\nsecrets = [{ env = \"IDEMGATE_TEST_GH_HOOK\" }]\n",
    );
    // At start-up and in check-config alike.
    for args in [
        vec!["--config", f.path()],
        vec!["check-config", "--config", f.path()],
    ] {
        let o = idemgate(&args, &[]);
        assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
        assert!(
            stderr(&o).contains("routes[0].secrets[0].env: the environment variable IDEMGATE_TEST_GH_HOOK is not set"),
            "{}",
            stderr(&o)
        );
    }
    let o = idemgate(
        &["check-config", "--config", f.path()],
        &[("IDEMGATE_TEST_GH_HOOK", "s3cr3t-hook-value")],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("preset = \"github\""), "{out}");
    assert!(
        out.contains("key_from = \"header:x-github-delivery\""),
        "{out}"
    );
    assert!(
        !out.contains("s3cr3t") && !stderr(&o).contains("s3cr3t"),
        "{out}"
    );
}

#[test]
fn check_config_shows_where_each_route_goes_and_checks_tls_files() {
    let f = file(
        "upstream = \"https://api.example.test\"\nupstream_ca_file = \"/nonexistent/ca.pem\"\n[[routes]]\npath = \"/billing/**\"\nupstream = \"http://127.0.0.1:9090\"\nupstream_protocol = \"h2c\"\n[[routes]]\npath = \"/x\"\nupstream_cert_file = \"/a.pem\"\n",
    );
    let o = idemgate(&["check-config", "--config", f.path()], &[]);
    assert_eq!(o.status.code(), Some(2));
    let err = stderr(&o);
    assert!(
        err.contains("upstream_ca_file: cannot read /nonexistent/ca.pem"),
        "{err}"
    );
    assert!(
        err.contains(
            "routes[1].upstream_cert_file: give upstream_cert_file and upstream_key_file together"
        ),
        "{err}"
    );
    // The HTTP routes alone: valid, and each route's upstream is shown.
    let f = file(
        "upstream = \"http://127.0.0.1:8080\"\n[[routes]]\npath = \"/billing/**\"\nupstream = \"http://127.0.0.1:9090\"\nupstream_protocol = \"h2c\"\nupstream_timeout = \"5s\"\n[[routes]]\npath = \"/v1/**\"\nrequired = true\n",
    );
    let o = idemgate(&["check-config", "--config", f.path()], &[]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = stdout(&o);
    let billing = out.split("[[routes]]").nth(1).unwrap();
    assert!(
        billing.contains("upstream = \"http://127.0.0.1:9090/\""),
        "{out}"
    );
    assert!(billing.contains("upstream_protocol = \"h2c\""), "{out}");
    assert!(billing.contains("upstream_timeout = \"5s\""), "{out}");
    let v1 = out.split("[[routes]]").nth(2).unwrap();
    assert!(
        !v1.contains("upstream"),
        "a route without its own upstream shows none: {out}"
    );
    // h2c over https, and TLS settings for a plaintext upstream, are refused.
    let f = file("upstream = \"https://a.test\"\nupstream_protocol = \"h2c\"\n");
    let o = idemgate(&["check-config", "--config", f.path()], &[]);
    assert!(
        stderr(&o).contains("upstream_protocol: \"h2c\" is HTTP/2 in plaintext"),
        "{}",
        stderr(&o)
    );
    let f = file("upstream = \"http://a.test\"\ndanger_accept_invalid_certs = true\n");
    let o = idemgate(&["check-config", "--config", f.path()], &[]);
    assert!(
        stderr(&o).contains("upstream: TLS settings need an https:// upstream"),
        "{}",
        stderr(&o)
    );
}
