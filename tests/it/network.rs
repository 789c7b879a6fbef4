//! Networks that misbehave (issue 14): the real `vrun setup` against `testkit::serve` on
//! 127.0.0.1 with the faults an operator meets — a failing sibling download, trickles,
//! a server that never answers, a file that changes between two requests, connections
//! cut every megabyte, private-CA TLS, credentials in URLs, interrupted setups, bad
//! proc.yaml values, dead proxies, refused redirects, encodings, decoder memory and empty
//! archives. Each test checks the exit code, the one `ERROR:` line (and any `vrun:`
//! notice it expects), a generous bound on wall time (limits are made small with the
//! `VRUN_*` variables, so each test takes seconds; the bound only catches a hang), and
//! what is left under the root.

use crate::common;
use testkit::noise;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{wait_until, Run, TestDir, Vrun};
use md5::{Digest, Md5};
use sha2::Sha256;
use testkit::serve::{Fault, Server, ServerOptions};

/// Far above what any of these tests needs; only a hang reaches it.
const BOUND: Duration = Duration::from_secs(45);

fn run(cmd: &mut Command) -> Vec<u8> {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// A build: a Procfile and `files` files of `size` noise bytes each (seeded by `seed`),
/// as a plain GNU tar (`compress` = None) or piped through `compress` (e.g. `gzip -c`).
fn build(files: usize, size: usize, seed: u64, compress: Option<&[&str]>) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("Procfile"), "web: ./run\n").unwrap();
    for i in 0..files {
        fs::write(
            dir.path().join(format!("f{i}.bin")),
            noise(size, seed + i as u64),
        )
        .unwrap();
    }
    let tar = run(Command::new("tar")
        .args([
            "--format=gnu",
            "--mtime=@0",
            "--owner=0",
            "--group=0",
            "-cf",
            "-",
            "-C",
        ])
        .arg(dir.path())
        .arg("."));
    match compress {
        None => tar,
        Some(argv) => pipe(argv, &tar),
    }
}

fn pipe(argv: &[&str], input: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut child = Command::new(argv[0])
        .args(&argv[1..])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let data = input.to_vec();
    let feeder = std::thread::spawn(move || stdin.write_all(&data).unwrap());
    let out = child.wait_with_output().unwrap();
    feeder.join().unwrap();
    assert!(out.status.success(), "{argv:?}");
    out.stdout
}

fn gz(files: usize, size: usize, seed: u64) -> Vec<u8> {
    build(files, size, seed, Some(&["gzip", "-c"]))
}

fn md5_hex(b: &[u8]) -> String {
    hex::encode(Md5::digest(b))
}

fn sha256_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

const PORT: u16 = 5000;

fn proc_yaml(t: &TestDir, build: &str, md5: Option<&str>, image: Option<&str>) -> PathBuf {
    let md5 = md5.map_or(String::new(), |m| format!("build_md5: \"{m}\"\n"));
    let image = image.map_or(String::new(), |u| format!("image_url: \"{u}\"\n"));
    t.write(
        "proc.yaml",
        &format!(
            "app_name: shop\nversion: v7\nconfig_name: prod\nrelease_hash: abc123\n\
             proc_name: web\nport: {PORT}\nuser: nobody\ngroup: nogroup\n\
             build_url: \"{build}\"\n{md5}{image}"
        ),
    )
}

/// `vrun setup --timings FILE` with quick limits and no notices unless a test asks.
fn setup(t: &TestDir, file: &Path) -> Vrun {
    t.vrun([Path::new("setup"), Path::new("--timings"), file])
        .env("VRUN_CONNECT_TIMEOUT", "3")
        .env("VRUN_READ_TIMEOUT", "10")
        .env("VRUN_HTTP_BACKOFF", "0.05")
        .env("VRUN_NOTICE_AFTER", "600")
        .env_remove("http_proxy")
        .env_remove("HTTP_PROXY")
        .env_remove("https_proxy")
        .env_remove("HTTPS_PROXY")
        .env_remove("ALL_PROXY")
        .env_remove("SSL_CERT_FILE")
        .env_remove("SSL_CERT_DIR")
}

/// Run and return the result with its wall time, which must stay under [`BOUND`].
fn timed(v: Vrun) -> (Run, Duration) {
    let began = Instant::now();
    let r = v.run();
    let took = began.elapsed();
    assert!(took < BOUND, "took {took:?}: {r:#?}");
    (r, took)
}

/// The single `ERROR:` line of a failed run (other lines must be `vrun:` notices).
fn error_line(r: &Run) -> String {
    assert_eq!(r.code, Some(1), "{r:#?}");
    let errors: Vec<&str> = r
        .stderr
        .lines()
        .filter(|l| l.starts_with("ERROR: "))
        .collect();
    assert_eq!(errors.len(), 1, "one ERROR line: {r:#?}");
    for l in r.stderr.lines() {
        assert!(l.starts_with("ERROR: ") || l.starts_with("vrun: "), "{l:?}");
    }
    errors[0].to_string()
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = match fs::read_dir(dir) {
        Ok(rd) => rd
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => Vec::new(),
    };
    v.sort();
    v
}

fn cache(t: &TestDir) -> PathBuf {
    t.root().join("cache")
}

/// The name of a URL's resumable partial under `ingest-v1/`.
fn partial_name(url: &str) -> String {
    format!("partial-{}", sha256_hex(url.as_bytes()))
}

/// Nothing published and no proc: only `ingest` (names) is left in the store's ingest.
fn assert_left_only(t: &TestDir, ingest: &[String]) {
    let c = cache(t);
    assert_eq!(names(&c.join("blobs-v1/sha256")), Vec::<String>::new());
    assert_eq!(
        names(&c.join(common::layers_bucket())),
        Vec::<String>::new()
    );
    assert_eq!(names(&c.join("index-v1/md5")), Vec::<String>::new());
    assert_eq!(names(&c.join("index-v1/url")), Vec::<String>::new());
    assert_eq!(names(&c.join("ingest-v1")), ingest);
    assert_eq!(names(&t.root().join("procs")), Vec::<String>::new());
}

fn partial_len(t: &TestDir, url: &str) -> u64 {
    fs::metadata(
        cache(t)
            .join("ingest-v1")
            .join(partial_name(url))
            .join("blob"),
    )
    .map_or(0, |m| m.len())
}

// ------------------------------------------------------------------ 1. fail fast

#[test]
fn a_failing_build_cancels_the_image_download_at_once() {
    // vr.runners fetched build and image one after the other; vrun fetches both at once,
    // and (issue 14.1) the first failure must not wait for the other download to end.
    let t = TestDir::new();
    let image = gz(1, 200_000, 3);
    let server = Server::start([("/img.tar.gz", image)], ServerOptions::default()).unwrap();
    // The image never finishes: it is held at 50 000 bytes.
    server.set_fault("/img.tar.gz", Fault::new().gate_after(50_000));
    // The build answers 404, a second late, by when the image is well under way.
    server.insert("/gone.tar.gz", gz(1, 1000, 4)).unwrap();
    server.set_fault(
        "/gone.tar.gz",
        Fault::new()
            .fail(u32::MAX, 404)
            .delay_head(Duration::from_secs(1), u32::MAX),
    );
    let (build_url, image_url) = (server.url("/gone.tar.gz"), server.url("/img.tar.gz"));
    let file = proc_yaml(&t, &build_url, None, Some(&image_url));
    let v = setup(&t, &file);
    let (r, _) = timed(v);
    assert_eq!(
        error_line(&r),
        format!("ERROR: GET {build_url}: 404 Not Found")
    );
    assert!(server.request_count("/img.tar.gz") >= 1, "both started");
    // The image's partial download is kept for the next setup to resume.
    assert_left_only(&t, &[partial_name(&image_url)]);
    let kept = partial_len(&t, &image_url);
    assert!(kept > 0 && kept <= 50_000, "{kept}");
}

// ------------------------------------------------------------------ 2. stalls and waits

#[test]
fn a_trickling_server_fails_by_the_low_speed_rule() {
    // One byte every 200 ms resets any idle timer forever; the low-speed rule does not.
    let t = TestDir::new();
    let body = gz(1, 20_000, 5);
    let server = Server::start([("/b.tar.gz", body)], ServerOptions::default()).unwrap();
    server.set_fault(
        "/b.tar.gz",
        Fault::new().trickle(1, Duration::from_millis(200)),
    );
    let url = server.url("/b.tar.gz");
    let file = proc_yaml(&t, &url, None, None);
    let (r, _) = timed(
        setup(&t, &file)
            .env("VRUN_SPEED_LIMIT", "1000")
            .env("VRUN_SPEED_TIME", "2")
            .env("VRUN_NOTICE_AFTER", "1"),
    );
    let line = error_line(&r);
    assert!(
        line.starts_with(&format!("ERROR: GET {url}: too slow: ")),
        "{line}"
    );
    assert!(
        line.ends_with(" bytes in the last 2s, below the low-speed limit of 1000 B/s (VRUN_SPEED_LIMIT, VRUN_SPEED_TIME)"),
        "{line}"
    );
    assert!(
        r.stderr.contains(&format!("vrun: {url} is sending ")),
        "a notice said what it waits for: {r:#?}"
    );
    assert_eq!(
        server.request_count("/b.tar.gz"),
        1,
        "a stall is not retried"
    );
    assert_left_only(&t, &[partial_name(&url)]);
}

#[test]
fn a_server_that_never_answers_is_announced_then_fails() {
    let t = TestDir::new();
    let server = Server::start([("/b.tar.gz", gz(1, 1000, 6))], ServerOptions::default()).unwrap();
    server.set_fault("/b.tar.gz", Fault::new().never_answer());
    let url = server.url("/b.tar.gz");
    let file = proc_yaml(&t, &url, None, None);
    let (r, _) = timed(
        setup(&t, &file)
            .env("VRUN_SPEED_TIME", "3")
            .env("VRUN_NOTICE_AFTER", "1"),
    );
    assert_eq!(
        error_line(&r),
        format!("ERROR: GET {url}: too slow: 0 bytes in the last 3s, below the low-speed limit of 1024 B/s (VRUN_SPEED_LIMIT, VRUN_SPEED_TIME)")
    );
    assert!(
        r.stderr.contains(&format!(
            "vrun: waiting for {url} to answer (1s so far; gives up after 13s)"
        )),
        "{r:#?}"
    );
    assert_left_only(&t, &[]); // not a byte arrived: no partial worth keeping
}

#[test]
fn waits_on_another_setup_and_on_gc_name_the_holder() {
    let t = TestDir::new();
    let body = gz(1, 100_000, 7);
    let server = Server::start([("/b.tar.gz", body.clone())], ServerOptions::default()).unwrap();
    server.set_fault("/b.tar.gz", Fault::new().gate_after(10_000));
    let url = server.url("/b.tar.gz");
    let first = setup(&t, &proc_yaml(&t, &url, None, None)).spawn();
    wait_until("the first download to start", BOUND, || {
        server.bytes_sent("/b.tar.gz") >= 10_000
    });
    let second_dir = t.path().join("second");
    fs::create_dir(&second_dir).unwrap();
    let f2 = second_dir.join("proc.yaml");
    fs::copy(t.path().join("proc.yaml"), &f2).unwrap();
    let second = setup(&t, &f2).env("VRUN_NOTICE_AFTER", "0.5").spawn();
    let gc = t.vrun(["cache", "gc"]).spawn();
    // Let both waits last past the notice delay, then let the download finish.
    std::thread::sleep(Duration::from_millis(1500));
    let pid = first.id();
    server.open_gate("/b.tar.gz");
    let (r1, r2, g) = (first.finish(), second.finish(), gc.finish());
    r1.assert_ok();
    r2.assert_ok();
    g.assert_ok();
    assert!(
        r2.stderr
            .contains(&format!("vrun: waiting for pid {pid} ("))
            && r2.stderr.contains(&format!(" to finish with {url} (lock ")),
        "{r2:#?}"
    );
    assert!(
        g.stderr.contains(&format!("vrun: waiting for pid {pid} ("))
            && g.stderr.contains("to finish with the cache (lock "),
        "{g:#?}"
    );
    assert_eq!(server.request_count("/b.tar.gz"), 1, "downloaded once");
}

// ------------------------------------------------------------------ 3. no splice

#[test]
fn a_file_changed_between_requests_without_validators_is_fetched_again_from_byte_0() {
    // vr.runners never resumed. vrun's first client sent Range without If-Range when the
    // server gave no validator, and published half of each version (exit 0).
    let t = TestDir::new();
    let v1 = build(2, 300_000, 10, None);
    let v2 = build(2, 300_000, 20, None);
    assert_eq!(v1.len(), v2.len(), "same length: a Range would be accepted");
    let opts = ServerOptions {
        etag: false,
        last_modified: false,
        ..ServerOptions::default()
    };
    let server = Server::start([("/b.tar", v1)], opts).unwrap();
    server.set_fault(
        "/b.tar",
        Fault::new()
            .drop_after(250_000, 1)
            .replace_after(1, v2.clone()),
    );
    let url = server.url("/b.tar");
    let file = proc_yaml(&t, &url, None, None);
    let (r, _) = timed(setup(&t, &file));
    r.assert_ok();
    let reqs = server.requests("/b.tar");
    assert_eq!(reqs.len(), 2);
    assert_eq!(reqs[1].range, None, "no validator: no resume");
    assert_eq!(
        names(&cache(&t).join("blobs-v1/sha256")),
        vec![sha256_hex(&v2)]
    );
    assert_eq!(names(&cache(&t).join("ingest-v1")), Vec::<String>::new());
}

// ------------------------------------------------------------------ 4. progress

#[test]
fn a_connection_cut_after_every_megabyte_still_completes() {
    // A proxy that caps connection length: the old client gave up after 4 MB of 10.
    let t = TestDir::new();
    let body = gz(1, 10 << 20, 30);
    let server = Server::start([("/b.tar.gz", body.clone())], ServerOptions::default()).unwrap();
    server.set_fault("/b.tar.gz", Fault::new().cut_every(1 << 20));
    let url = server.url("/b.tar.gz");
    let file = proc_yaml(&t, &url, Some(&md5_hex(&body)), None);
    let (r, _) = timed(setup(&t, &file).env("VRUN_HTTP_RETRIES", "3"));
    r.assert_ok();
    let reqs = server.requests("/b.tar.gz");
    assert_eq!(reqs.len(), body.len().div_ceil(1 << 20));
    assert!(reqs[1..]
        .iter()
        .all(|r| r.range.is_some() && r.if_range.is_some()));
    assert_eq!(
        names(&cache(&t).join("blobs-v1/sha256")),
        vec![sha256_hex(&body)]
    );
}

// ------------------------------------------------------------------ 5. TLS

struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    /// A CA, a server certificate for 127.0.0.1 signed by it, made with the openssl CLI.
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let ossl = |args: &[&str]| {
            run(Command::new("openssl").args(args).current_dir(d));
        };
        ossl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=vrun test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]);
        ossl(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ]);
        fs::write(
            d.join("ext.cnf"),
            "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        ossl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ]);
        Pki { dir }
    }
    fn read(&self, name: &str) -> Vec<u8> {
        fs::read(self.dir.path().join(name)).unwrap()
    }
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

#[test]
fn https_with_a_private_ca_works_with_ssl_cert_file_and_fails_fast_without() {
    let pki = Pki::new();
    let body = gz(1, 100_000, 40);
    let opts = ServerOptions::default()
        .tls_from_pem(&pki.read("server.pem"), &pki.read("server.key"))
        .unwrap();
    let server = Server::start([("/b.tar.gz", body.clone())], opts).unwrap();
    let url = server.url("/b.tar.gz");
    assert!(url.starts_with("https://127.0.0.1:"));

    let t = TestDir::new();
    let file = proc_yaml(&t, &url, Some(&md5_hex(&body)), None);
    let (r, _) = timed(setup(&t, &file).env("SSL_CERT_FILE", pki.path("ca.pem")));
    r.assert_ok();
    assert_eq!(
        names(&cache(&t).join("blobs-v1/sha256")),
        vec![sha256_hex(&body)]
    );

    // Without the CA: one attempt, one line naming the cause and the trust store.
    let t = TestDir::new();
    let file = proc_yaml(&t, &url, Some(&md5_hex(&body)), None);
    let (r, _) = timed(setup(&t, &file).env("VRUN_HTTP_RETRIES", "3"));
    assert_eq!(
        error_line(&r),
        format!("ERROR: GET {url}: TLS certificate of 127.0.0.1 rejected: it is signed by an unknown certificate authority (trusting the system store /etc/ssl/certs; set SSL_CERT_FILE to a private CA's certificate)")
    );
    assert_eq!(
        server.request_count("/b.tar.gz"),
        1,
        "only the first, trusted run got through"
    );
    assert_left_only(&t, &[]);

    // A server presenting its CA certificate as its own certificate.
    let opts = ServerOptions::default()
        .tls_from_pem(&pki.read("ca.pem"), &pki.read("ca.key"))
        .unwrap();
    let ca_server = Server::start([("/b.tar.gz", body.clone())], opts).unwrap();
    let url = ca_server.url("/b.tar.gz");
    let t = TestDir::new();
    let file = proc_yaml(&t, &url, None, None);
    let (r, _) = timed(setup(&t, &file).env("SSL_CERT_FILE", pki.path("ca.pem")));
    let line = error_line(&r);
    assert!(
        line.starts_with(&format!(
            "ERROR: GET {url}: TLS certificate of 127.0.0.1 rejected: "
        )) && line.ends_with(&format!(
            "(trusting only SSL_CERT_FILE={})",
            pki.path("ca.pem").display()
        )),
        "{line}"
    );
    assert!(!line.contains("attempts"), "never retried: {line}");
}

// ------------------------------------------------------------------ 6. credentials

#[test]
fn credentials_in_a_url_never_reach_messages_timings_ls_or_the_index() {
    let body = gz(1, 50_000, 50);
    let server = Server::start([("/b.tar.gz", body.clone())], ServerOptions::default()).unwrap();
    let secret = "s3cr3t-pw";
    let with_creds = |path: &str| {
        server
            .url(path)
            .replacen("http://", &format!("http://deployer:{secret}@"), 1)
    };
    let t = TestDir::new();
    let file = proc_yaml(&t, &with_creds("/b.tar.gz"), Some(&md5_hex(&body)), None);
    let (r, _) = timed(setup(&t, &file));
    r.assert_ok();
    let shown = server
        .url("/b.tar.gz")
        .replacen("http://", "http://***@", 1);
    assert!(r.stdout.contains(&shown), "{r:#?}");
    let ls = t.vrun(["cache", "ls"]).run();
    let ls_json = t.vrun(["cache", "ls", "--json"]).run();
    ls.assert_ok();
    ls_json.assert_ok();
    assert!(ls.stdout.contains(&shown), "{ls:#?}");
    for out in [
        &r.stdout,
        &r.stderr,
        &ls.stdout,
        &ls.stderr,
        &ls_json.stdout,
    ] {
        assert!(!out.contains(secret), "{out}");
    }
    // Every file of the store, index entries included: no secret, and index entries
    // readable by their owner only.
    for f in testkit::walk(&cache(&t)) {
        if f.meta.is_dir() {
            continue;
        }
        if let Ok(text) = fs::read(&f.path) {
            assert!(
                !String::from_utf8_lossy(&text).contains(secret),
                "{}",
                f.path.display()
            );
        }
    }
    use std::os::unix::fs::PermissionsExt;
    for dir in ["index-v1/url", "index-v1/md5"] {
        for name in names(&cache(&t).join(dir)) {
            let mode = fs::metadata(cache(&t).join(dir).join(&name))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "{dir}/{name} is {mode:o}");
        }
    }

    // A failure names the URL without its credentials.
    let t = TestDir::new();
    let url = with_creds("/missing.tar.gz");
    let (r, _) = timed(setup(&t, &proc_yaml(&t, &url, None, None)));
    let shown = server
        .url("/missing.tar.gz")
        .replacen("http://", "http://***@", 1);
    assert_eq!(error_line(&r), format!("ERROR: GET {shown}: 404 Not Found"));
    assert!(!r.stderr.contains(secret));
}

// ------------------------------------------------------------------ 7. interruption

#[test]
fn a_terminated_setup_keeps_its_partial_says_so_and_gc_removes_it_once_unheld() {
    let t = TestDir::new();
    let body = gz(1, 400_000, 60);
    let server = Server::start([("/b.tar.gz", body.clone())], ServerOptions::default()).unwrap();
    server.set_fault("/b.tar.gz", Fault::new().gate_after(100_000));
    let url = server.url("/b.tar.gz");
    let file = proc_yaml(&t, &url, Some(&md5_hex(&body)), None);
    let running = setup(&t, &file).spawn();
    wait_until("the download to reach the gate", BOUND, || {
        partial_len(&t, &url) >= 100_000
    });
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(running.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let r = running.finish();
    assert_eq!(r.code, Some(128 + 15), "{r:#?}");
    assert_eq!(
        r.stderr.trim_end(),
        format!("ERROR: interrupted by SIGTERM while downloading; kept 100000 bytes of {url} for the next setup to resume")
    );
    // Its staging dir is gone (cleaned up on the way out); the partial stays.
    assert_left_only(&t, &[partial_name(&url)]);
    // The automatic policy (after another proc's setup and teardown, here over a 1-byte
    // budget so that it collects) keeps a recent partial: the deploy is usually retried.
    let other = Server::start([("/c.tar.gz", gz(1, 1000, 61))], ServerOptions::default()).unwrap();
    let other_file = proc_yaml(&t, &other.url("/c.tar.gz"), None, None);
    setup(&t, &other_file).run().assert_ok();
    // Without its stamp the policy looks at the store now (not at most once an hour).
    fs::remove_file(cache(&t).join("autogc-v1.stamp")).unwrap();
    t.vrun([Path::new("teardown"), &other_file])
        .env("VRUN_CACHE_MAX_SIZE", "1")
        .run()
        .assert_ok();
    assert_left_only(&t, &[partial_name(&url)]);
    // No live setup holds it: an explicit gc removes it at once (not after a day).
    let gc = t.vrun(["cache", "gc"]).run();
    gc.assert_ok();
    assert!(gc.stdout.contains(&partial_name(&url)), "{gc:#?}");
    assert_left_only(&t, &[]);
}

// ------------------------------------------------------------------ 8. messages

#[test]
fn a_bad_md5_in_proc_yaml_is_refused_before_any_io() {
    let t = TestDir::new();
    let server = Server::start([("/b.tar.gz", gz(1, 100, 70))], ServerOptions::default()).unwrap();
    let file = proc_yaml(&t, &server.url("/b.tar.gz"), Some("not-an-md5"), None);
    let (r, _) = timed(setup(&t, &file));
    assert_eq!(
        error_line(&r),
        format!(
            "ERROR: {}: build_md5: \"not-an-md5\" is not an md5 (32 hex digits)",
            file.display()
        )
    );
    assert_eq!(server.log().len(), 0);
    assert_eq!(
        t.root_entries(),
        Vec::<PathBuf>::new(),
        "the host is as it was"
    );
}

#[test]
fn a_dead_proxy_is_named_as_the_proxy() {
    let t = TestDir::new();
    let server = Server::start([("/b.tar.gz", gz(1, 100, 71))], ServerOptions::default()).unwrap();
    let url = server.url("/b.tar.gz");
    // A port nothing listens on (bound, then closed).
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let file = proc_yaml(&t, &url, None, None);
    let (r, _) = timed(
        setup(&t, &file)
            .env("HTTP_PROXY", format!("http://{dead}"))
            .env("NO_PROXY", "")
            .env("VRUN_HTTP_RETRIES", "0"),
    );
    let line = error_line(&r);
    assert!(
        line.starts_with(&format!(
            "ERROR: GET {url}: cannot connect to the proxy http://{dead}/ (from HTTP_PROXY): "
        )),
        "{line}"
    );
    assert_eq!(server.log().len(), 0);
}

#[test]
fn a_refused_redirect_says_where_to_and_why() {
    let t = TestDir::new();
    let server = Server::start([("/b.tar.gz", gz(1, 100, 72))], ServerOptions::default()).unwrap();
    server.set_fault(
        "/b.tar.gz",
        Fault::new().redirect(302, "ftp://127.0.0.1/b.tar.gz"),
    );
    let url = server.url("/b.tar.gz");
    let (r, _) = timed(setup(&t, &proc_yaml(&t, &url, None, None)));
    let line = error_line(&r);
    assert!(line.starts_with(&format!("ERROR: GET {url}: ")), "{line}");
    assert!(line.contains("ftp://127.0.0.1/b.tar.gz"), "{line}");
    assert!(line.contains("not http or https"), "{line}");
    assert_eq!(server.request_count("/b.tar.gz"), 1, "not retried");
}

#[test]
fn a_tar_gz_sent_with_content_encoding_gzip_is_decoded_and_checked() {
    // A server compressing an already compressed file on the fly (the old client read
    // the inner gzip as a tar header: "numeric field did not have utf-8 text").
    let t = TestDir::new();
    let body = gz(1, 100_000, 73);
    let wire = pipe(&["gzip", "-c"], &body);
    let server = Server::start([("/b.tar.gz", wire)], ServerOptions::default()).unwrap();
    server.set_fault("/b.tar.gz", Fault::new().content_encoding("gzip"));
    let url = server.url("/b.tar.gz");
    let (r, _) = timed(setup(&t, &proc_yaml(&t, &url, Some(&md5_hex(&body)), None)));
    r.assert_ok();
    assert_eq!(
        names(&cache(&t).join("blobs-v1/sha256")),
        vec![sha256_hex(&body)]
    );
    // An encoding vrun cannot undo is named.
    let t = TestDir::new();
    server.set_fault("/b.tar.gz", Fault::new().content_encoding("br"));
    let (r, _) = timed(setup(&t, &proc_yaml(&t, &url, None, None)));
    assert_eq!(
        error_line(&r),
        format!("ERROR: GET {url}: the server applied Content-Encoding: br although vrun asked for identity; vrun decodes only gzip: serve the file as it is")
    );
}

#[test]
fn a_failed_blob_write_is_reported_as_such_not_as_corruption() {
    // The old message for a full disk under the blob was "gzip stream is corrupt". A file
    // size limit makes the blob (the only big file) fail to grow, deterministically.
    let t = TestDir::new();
    let body = gz(8, 1 << 20, 74);
    let server = Server::start([("/b.tar.gz", body.clone())], ServerOptions::default()).unwrap();
    let url = server.url("/b.tar.gz");
    let mut v = setup(&t, &proc_yaml(&t, &url, None, None));
    use std::os::unix::process::CommandExt;
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        v.cmd.pre_exec(|| {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let lim = libc::rlimit {
                rlim_cur: 3 << 20,
                rlim_max: 3 << 20,
            };
            libc::setrlimit(libc::RLIMIT_FSIZE, &lim);
            Ok(())
        });
    }
    let (r, _) = timed(v);
    let blob = fs::canonicalize(cache(&t))
        .unwrap()
        .join("ingest-v1")
        .join(partial_name(&url))
        .join("blob");
    assert_eq!(
        error_line(&r),
        format!(
            "ERROR: {url}: cannot write {}: File too large (os error 27)",
            blob.display()
        )
    );
    assert_left_only(&t, &[]);
}

// ------------------------------------------------------------------ 10. bounds

#[test]
fn decoder_memory_is_capped_with_one_clear_line() {
    // `xz -6` needs a 9 MiB dictionary; with a 1 MiB cap it is refused, not "corrupt".
    let t = TestDir::new();
    let body = build(1, 100_000, 80, Some(&["xz", "-6", "-c"]));
    let server = Server::start([("/b.tar.xz", body)], ServerOptions::default()).unwrap();
    let url = server.url("/b.tar.xz");
    let (r, _) = timed(setup(&t, &proc_yaml(&t, &url, None, None)).env("VRUN_DECODE_MEMORY", "1M"));
    let line = error_line(&r);
    assert!(line.starts_with(&format!("ERROR: {url}: ")), "{line}");
    assert!(
        line.ends_with("xz stream needs more memory than the decoder limit of 1 MiB (its dictionary or window is that large); set VRUN_DECODE_MEMORY higher to accept it"),
        "{line}"
    );
    assert_left_only(&t, &[]);
    // zstd: a 16 MiB window (--long=24) against the same cap.
    let t = TestDir::new();
    let body = build(1, 100_000, 81, Some(&["zstd", "-q", "--long=24", "-c"]));
    let server = Server::start([("/b.tar.zst", body)], ServerOptions::default()).unwrap();
    let url = server.url("/b.tar.zst");
    let (r, _) = timed(setup(&t, &proc_yaml(&t, &url, None, None)).env("VRUN_DECODE_MEMORY", "1M"));
    let line = error_line(&r);
    assert!(line.starts_with(&format!("ERROR: {url}: ")), "{line}");
    assert!(
        line.ends_with("zstd stream needs more memory than the decoder limit of 1 MiB (its dictionary or window is that large); set VRUN_DECODE_MEMORY higher to accept it"),
        "{line}"
    );
    // The default cap is 32 MiB: the same files decode.
    assert_eq!(vrun::decode::DEFAULT_DECODE_MEMORY, 32 << 20);
    let t = TestDir::new();
    let (r, _) = timed(setup(&t, &proc_yaml(&t, &url, None, None)));
    r.assert_ok();
}

#[test]
fn an_archive_with_no_entries_is_refused() {
    let t = TestDir::new();
    let empty = pipe(
        &["gzip", "-c"],
        &run(Command::new("tar").args(["-cf", "-", "-T", "/dev/null"])),
    );
    let server = Server::start([("/b.tar.gz", empty)], ServerOptions::default()).unwrap();
    let url = server.url("/b.tar.gz");
    let (r, _) = timed(setup(&t, &proc_yaml(&t, &url, None, None)));
    assert_eq!(
        error_line(&r),
        format!("ERROR: {url}: the build archive has no entries (only end-of-archive blocks)")
    );
    assert_left_only(&t, &[]);
}

/// A tar that stops on a header boundary without its two end blocks: GNU tar 1.34 (and
/// vr.runners, through Python's tarfile) extract it silently. vrun extracts it when
/// something proves the stream whole — a compressed stream's own end check, or an md5 —
/// and refuses a plain tar with neither, naming the entry: a download cut on a block
/// boundary looks exactly like it.
#[test]
fn a_tar_without_end_blocks_is_taken_when_something_proves_it_whole() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("Procfile"), "web: ./run\n").unwrap();
    let tar = run(Command::new("tar")
        .args(["-cf", "-", "-C"])
        .arg(dir.path())
        .arg("Procfile"));
    let mut cut = tar.clone();
    while cut.len() >= 512 && cut[cut.len() - 512..].iter().all(|&b| b == 0) {
        cut.truncate(cut.len() - 512);
    }
    assert_eq!(cut.len(), 1024, "one header and one data block");
    let gz = pipe(&["gzip", "-c"], &cut);
    let server = Server::start(
        [("/b.tar", cut.clone()), ("/b.tar.gz", gz)],
        ServerOptions::default(),
    )
    .unwrap();

    let t = TestDir::new();
    let url = server.url("/b.tar");
    let (r, _) = timed(setup(&t, &proc_yaml(&t, &url, None, None)));
    assert_eq!(
        error_line(&r),
        format!(
            "ERROR: {url}: the build archive (plain tar) ends after entry Procfile without its \
             end-of-archive blocks, and with no build_md5 nothing proves it complete \
             (give build_md5, or serve it compressed)"
        )
    );
    assert_left_only(&t, &[]);

    for (path, md5) in [("/b.tar", Some(md5_hex(&cut))), ("/b.tar.gz", None)] {
        let t = TestDir::new();
        let url = server.url(path);
        let (r, _) = timed(setup(&t, &proc_yaml(&t, &url, md5.as_deref(), None)));
        assert_eq!(r.code, Some(0), "{path}: {r:#?}");
        let layers = names(&cache(&t).join(common::layers_bucket()));
        assert_eq!(layers.len(), 1, "{path}: {layers:?}");
        let got = fs::read(
            cache(&t)
                .join(common::layers_bucket())
                .join(&layers[0])
                .join("root/app/Procfile"),
        );
        assert_eq!(got.unwrap(), b"web: ./run\n", "{path}");
    }
}
