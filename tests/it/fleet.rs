//! A fleet behind a real caching proxy (issue 14): Debian's `nginx-light`, configured by
//! this test as the README's "Deploying to a fleet" section says (forward proxy, cache
//! in 1 MiB slices, `proxy_cache_lock on`), started on 127.0.0.1 with its own prefix,
//! pid, log, temp and cache dirs and stopped by a guard. Eight roots set up the same
//! build and image at the same moment through `HTTP_PROXY`; every tree must be identical,
//! and the origin must send each artifact's bytes exactly once.
//!
//! The figures (wall time of the eight, each setup's `total_s`) are printed with
//! `--nocapture` for the closing note; nothing here asserts a duration beyond a bound
//! against hangs.

use crate::common;
use testkit::noise;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{wait_until, ChildGuard, TestDir};
use sha2::Digest;
use testkit::serve::{Fault, Server, ServerOptions};

const SETUPS: usize = 8;

/// A gzipped GNU tar of a Procfile and `n` noise files of `size` bytes.
fn archive(n: usize, size: usize, seed: u64) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("Procfile"), "web: ./run\n").unwrap();
    for i in 0..n {
        fs::create_dir_all(dir.path().join(format!("d{}", i % 3))).unwrap();
        fs::write(
            dir.path().join(format!("d{}/f{i}.bin", i % 3)),
            noise(size, seed + i as u64),
        )
        .unwrap();
    }
    let out = Command::new("sh")
        .arg("-c")
        .arg("tar --format=gnu -cf - -C \"$0\" . | gzip -c")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    out.stdout
}

/// The README's nginx configuration, with this test's paths and ports.
fn nginx_conf(prefix: &Path, port: u16) -> String {
    let p = prefix.display();
    format!(
        r#"user root;
worker_processes 2;
daemon off;
pid {p}/nginx.pid;
error_log {p}/error.log warn;
events {{ worker_connections 512; }}
http {{
    access_log {p}/access.log;
    client_body_temp_path {p}/tmp/body;
    proxy_temp_path {p}/tmp/proxy;
    fastcgi_temp_path {p}/tmp/fastcgi;
    uwsgi_temp_path {p}/tmp/uwsgi;
    scgi_temp_path {p}/tmp/scgi;
    proxy_cache_path {p}/cache levels=1:2 keys_zone=builds:10m max_size=10g inactive=7d use_temp_path=off;
    server {{
        listen 127.0.0.1:{port};
        location / {{
            # A forward proxy: vrun sends absolute-form requests (HTTP_PROXY).
            proxy_pass http://$http_host;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            # Cache in 1 MiB slices: waiting clients get each slice as soon as it is in,
            # instead of waiting for the whole file behind the cache lock.
            slice 1m;
            proxy_set_header Range $slice_range;
            proxy_cache builds;
            proxy_cache_key $http_host$uri$slice_range;
            proxy_cache_valid 200 206 7d;
            # One request per slice goes to the origin; the others wait for it.
            proxy_cache_lock on;
            proxy_cache_lock_timeout 10m;
            proxy_cache_lock_age 10m;
        }}
    }}
}}
"#
    )
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn layer_roots(t: &TestDir) -> Vec<PathBuf> {
    let layers = t.root().join("cache").join(common::layers_bucket());
    let mut v: Vec<PathBuf> = fs::read_dir(&layers)
        .unwrap()
        .map(|e| e.unwrap().path().join("root"))
        .collect();
    v.sort();
    v
}

#[test]
fn eight_roots_behind_nginx_get_identical_trees_and_the_origin_sends_each_artifact_once() {
    let build = archive(12, 300_000, 1); // ~3.6 MB
    let image = archive(20, 250_000, 100); // ~5 MB
    let origin = Server::start(
        [
            ("/builds/shop.tar.gz", build.clone()),
            ("/images/base.tar.gz", image.clone()),
        ],
        ServerOptions::default(),
    )
    .unwrap();
    // A modest origin link, so that all eight setups overlap on it.
    for path in ["/builds/shop.tar.gz", "/images/base.tar.gz"] {
        origin.set_fault(path, Fault::new().throttle(8 << 20));
    }

    let prefix = tempfile::tempdir().unwrap();
    fs::create_dir_all(prefix.path().join("tmp")).unwrap();
    let port = free_port();
    let conf = prefix.path().join("nginx.conf");
    fs::write(&conf, nginx_conf(prefix.path(), port)).unwrap();
    let mut nginx = Command::new("nginx");
    nginx
        .arg("-p")
        .arg(prefix.path())
        .arg("-c")
        .arg(&conf)
        .stdin(Stdio::null());
    std::os::unix::process::CommandExt::process_group(&mut nginx, 0);
    let _nginx = ChildGuard(nginx.spawn().expect("nginx (apt-get install nginx-light)"));
    wait_until("nginx to listen", Duration::from_secs(20), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });

    let (build_url, image_url) = (
        origin.url("/builds/shop.tar.gz"),
        origin.url("/images/base.tar.gz"),
    );
    let dirs: Vec<TestDir> = (0..SETUPS).map(|_| TestDir::new()).collect();
    let began = Instant::now();
    let running: Vec<_> = dirs
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let file = t.write(
                "proc.yaml",
                &format!(
                    "app_name: shop\nversion: v7\nconfig_name: prod\nrelease_hash: abc123\n\
                     proc_name: web\nport: {}\nuser: nobody\ngroup: nogroup\n\
                     build_url: \"{build_url}\"\nbuild_md5: {}\nimage_url: \"{image_url}\"\n",
                    5000 + i,
                    hex::encode(md5::Md5::digest(&build))
                ),
            );
            t.vrun([Path::new("setup"), Path::new("--timings"), &file])
                .env("HTTP_PROXY", format!("http://127.0.0.1:{port}"))
                .env_remove("http_proxy")
                .env_remove("NO_PROXY")
                .env_remove("no_proxy")
                .spawn()
        })
        .collect();
    let results: Vec<_> = running.into_iter().map(|r| r.finish()).collect();
    let wall = began.elapsed();
    let mut totals = Vec::new();
    for r in &results {
        r.assert_ok();
        let v: serde_json::Value = serde_json::from_str(r.stdout.trim()).unwrap();
        totals.push(v["total_s"].as_f64().unwrap());
    }
    totals.sort_by(f64::total_cmp);
    eprintln!(
        "fleet: {SETUPS} setups of a {} B build + {} B image through nginx: wall {:.2} s, total_s min {:.2} median {:.2} max {:.2}; origin sent {} + {} B in {} + {} requests",
        build.len(),
        image.len(),
        wall.as_secs_f64(),
        totals[0],
        totals[SETUPS / 2],
        totals[SETUPS - 1],
        origin.bytes_sent("/builds/shop.tar.gz"),
        origin.bytes_sent("/images/base.tar.gz"),
        origin.request_count("/builds/shop.tar.gz"),
        origin.request_count("/images/base.tar.gz"),
    );

    // The origin sent each artifact once, through the proxy.
    assert_eq!(origin.bytes_sent("/builds/shop.tar.gz"), build.len() as u64);
    assert_eq!(origin.bytes_sent("/images/base.tar.gz"), image.len() as u64);
    // Every origin request is one of nginx's 1 MiB slices (none came from vrun directly).
    assert!(
        origin.log().iter().all(|r| r.range.is_some()),
        "{:#?}",
        origin.log()
    );
    assert_eq!(
        origin.request_count("/builds/shop.tar.gz"),
        build.len().div_ceil(1 << 20)
    );
    // Every root holds the same two layers, with identical trees.
    let want: Vec<_> = layer_roots(&dirs[0])
        .iter()
        .map(|r| testkit::tree(r))
        .collect();
    assert_eq!(want.len(), 2);
    assert!(want[0].len() > 10 && want[1].len() > 10);
    for t in &dirs[1..] {
        let got: Vec<_> = layer_roots(t).iter().map(|r| testkit::tree(r)).collect();
        assert_eq!(got, want, "trees differ in {}", t.root().display());
    }
}
