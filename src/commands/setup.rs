//! `vrun setup FILE`: validate everything, fetch the build and image into the store (both
//! at once), then create the proc directory, mount its root and write its files.
//!
//! Order matters: lock, parse, name, owner, render the env files and proc.lxc in memory
//! first; only when all of that succeeded is anything created under `$VR_ROOT`, so bad
//! input leaves the host as it was. Downloads go through the store's ingest dir and are
//! published only when verified, so a failed download leaves no proc dir and no cache
//! entry.
//!
//! Then, as a Velociraptor host needs it (issue 12): the overlay is mounted on `rootfs/`
//! and stays mounted, so `rootfs/app` is the build for supervisord's `directory=`,
//! vr.server's uptest check and vr.builder's copies; the three files are written through
//! the mount (writing into a mounted overlay's `upper/` behind its back is undefined for
//! the kernel); proc.lxc is written too, as the runner spec says setup does. Running
//! setup again keeps `upper/` (the app's own writes), reuses the mount (or remounts it
//! when the layers changed) and rewrites the files. Last, with the store released, the
//! cache's automatic policy runs ([`super::autogc`]).

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use vrun::extract::Limits;
use vrun::fetch::HttpClient;
use vrun::lxc::{
    ensure_mounted_locked, lock_mount, render_setup_config, unmount_if_layers_changed, LxcProc,
};
use vrun::paths::Root;
use vrun::pipeline::{self, Artifact, ArtifactTimings, CacheUse, Prepared};
use vrun::state::ProcState;
use vrun::{envfiles, procfile};
use vrun_cache::{LayerKind, Store};

use crate::cli::SetupArgs;

pub fn setup(root: &Root, args: &SetupArgs) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let file = &args.proc.file;
    let _lock = super::lock(file)?;
    let (config, name) = super::load(file)?;
    let owner = config.owner()?;
    let cache_policy = super::autogc::policy()?;
    // Parsed before anything is touched, so a bad value is a one-line error.
    let layers = vrun::layers::LayersRequest::from_flag_or_env(
        args.layers.as_deref(),
        std::env::var(vrun::layers::LAYERS_ENV).ok().as_deref(),
    )?;
    let host_env = |var: &str| std::env::var_os(var);
    if config.cmd.is_none() {
        if config.proc_name.is_none() {
            bail!("{}: needs either cmd or proc_name", file.display());
        }
        if config.build_url.is_none() {
            bail!(
                "{}: no cmd, and proc_name {:?} can only be resolved from a build's Procfile, but there is no build_url",
                file.display(),
                config.proc_name.as_deref().unwrap_or_default()
            );
        }
    }
    // Validate env, settings and proc.lxc before anything touches the disk or the
    // network (the layers are not known yet: only whether there is an image matters).
    envfiles::render(&config, config.cmd.as_deref().unwrap_or("true"), &host_env)?;
    let provisional = ProcState {
        build: None,
        image: None,
        build_layer: None,
        image_layer: config.image_url.as_ref().map(|_| "image".into()),
        uid: owner.uid,
        gid: owner.gid,
    };
    render_setup_config(
        &LxcProc::from_config_with_state(root, &name, &config, &owner, provisional).spec(),
    )?;

    let mut artifacts = Vec::new();
    if let Some(url) = &config.build_url {
        artifacts.push(Artifact {
            kind: LayerKind::Build,
            url: url.clone(),
            md5: config.build_md5.clone(),
            uid: owner.uid,
            gid: owner.gid,
            keep_blob: !args.no_blob,
            layers,
        });
    }
    if let Some(url) = &config.image_url {
        artifacts.push(Artifact {
            kind: LayerKind::Image,
            url: url.clone(),
            md5: config.image_md5.clone(),
            uid: 0,
            gid: 0,
            keep_blob: !args.no_blob,
            layers,
        });
    }
    for art in &artifacts {
        art.check().with_context(|| format!("{}", file.display()))?;
    }
    // The environment's tunables too, before anything is created.
    let notify: vrun::fetch::Notify = Arc::new(vrun::notice::emit);
    let http = HttpClient::from_env()?.with_notices(notify);
    vrun::decode::decode_memory_from_env().map_err(anyhow::Error::msg)?;
    // The store (and its shared lock) stays open until state.json names the layers:
    // a `vrun cache gc` in between would see them unreferenced and remove them.
    let (store, prepared) = if artifacts.is_empty() {
        (None, Vec::new())
    } else {
        let store = open_store(root)?;
        let prepared = match fetch_all(store.clone(), http, artifacts) {
            Ok(p) => p,
            Err(e) => {
                if let Some(Interrupted { signal, .. }) = e.downcast_ref::<Interrupted>() {
                    eprintln!("ERROR: {}", super::one_line(&e));
                    return Ok(ExitCode::from(128 + *signal as u8));
                }
                return Err(e);
            }
        };
        (Some(store), prepared)
    };
    let key_of = |kind: LayerKind| {
        prepared
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, p)| p.key.clone())
    };
    // Said once, even when both artifacts fell back.
    if let Some(why) = prepared.iter().find_map(|(_, p)| p.fallback.as_ref()) {
        eprintln!("vrun: {why}");
    }
    // An EROFS layer is mounted on its root now (once per host: a second proc finds the
    // mount): the Procfile is read from it, and the overlay stacks it.
    for (_, p) in &prepared {
        vrun::layers::ensure_ready(&p.layer)?;
    }
    let state = ProcState::new(
        &root.cache_dir(),
        key_of(LayerKind::Build),
        key_of(LayerKind::Image),
        owner.uid,
        owner.gid,
    );

    let command = match (&config.cmd, &state.build_layer) {
        (Some(cmd), _) => cmd.clone(),
        (None, Some(layer)) => {
            let proc_name = config.proc_name.as_deref().unwrap_or_default();
            procfile::resolve(&layer.join("app").join("Procfile"), proc_name)?
        }
        (None, None) => unreachable!("checked above: no cmd means a build_url"),
    };
    let files = envfiles::render(&config, &command, &host_env)?;
    let proc = LxcProc::from_config_with_state(root, &name, &config, &owner, state.clone());
    let (lxc_config, missing_volumes) = render_setup_config(&proc.spec())?;
    for warning in &files.warnings {
        eprintln!("WARNING: {warning}");
    }
    for v in missing_volumes {
        eprintln!(
            "WARNING: volume {} -> {}: the host dir does not exist; run refuses to start until it does",
            v.host.display(),
            v.container
        );
    }
    let paths = root.proc(&name);
    envfiles::create_proc_dirs(&paths)?;
    {
        // Under the mount lock: no shell/uptest starts on the old root meanwhile.
        let lock = lock_mount(&paths)?;
        let previous = ProcState::load(&paths.state(), &root.cache_dir()).ok();
        unmount_if_layers_changed(&lock, &proc, previous.as_ref())?;
        state.save(&paths.state())?;
        ensure_mounted_locked(&lock, &paths, &state, &proc.spec().host_system_dirs)?;
    }
    envfiles::write_files(&paths.rootfs(), &files, &owner)?;
    vrun_cache::write_atomic(&paths.lxc_config(), lxc_config.as_bytes(), 0o644, None)
        .with_context(|| format!("cannot write {}", paths.lxc_config().display()))?;
    eprintln!(
        "vrun: {name} is set up in {} ({:.2} s)",
        paths.dir.display(),
        started.elapsed().as_secs_f64()
    );
    if args.timings {
        println!("{}", timings_json(started, &prepared));
    }
    drop(store);
    let stored_new = prepared
        .iter()
        .any(|(_, p)| !matches!(p.timings.cache, CacheUse::Layer));
    super::autogc::after_setup(root, &cache_policy, stored_new);
    Ok(ExitCode::SUCCESS)
}

/// Open the store shared (waiting, with a message naming the holder, while gc or verify
/// run).
fn open_store(root: &Root) -> anyhow::Result<Arc<Store>> {
    let cache_dir = root.cache_dir();
    let store = Store::open_with(&cache_dir, false, |lock| {
        eprintln!(
            "vrun: waiting for cache maintenance by {} to finish ({} is locked)",
            pipeline::describe_holders(lock),
            lock.display()
        )
    })
    .with_context(|| format!("cannot open the cache in {}", cache_dir.display()))?;
    Ok(Arc::new(store))
}

/// Setup was stopped by a signal while downloading (what a deploy timeout sends).
#[derive(Debug, thiserror::Error)]
#[error("interrupted by {name} while downloading; {kept}")]
struct Interrupted {
    signal: i32,
    name: &'static str,
    kept: String,
}

/// Fetch every artifact concurrently into the store, each on its own task. The first
/// failure cancels the others at once (a failing build does not wait for the image's
/// download to end); a cancelled download keeps its partial blob for the next setup to
/// resume, and so does one stopped by SIGTERM, SIGINT or SIGHUP.
fn fetch_all(
    store: Arc<Store>,
    http: HttpClient,
    artifacts: Vec<Artifact>,
) -> anyhow::Result<Vec<(LayerKind, Prepared)>> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let urls: Vec<(String, String)> = artifacts
        .iter()
        .map(|a| (a.url.clone(), a.shown_url()))
        .collect();
    runtime.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let bars = super::progress::Bars::new();
        let mut tasks = tokio::task::JoinSet::new();
        let mut bars_of = Vec::new();
        for art in artifacts {
            let progress = bars.add(art.kind.as_str(), &art.shown_url());
            bars_of.push(progress.clone());
            let (store, http) = (store.clone(), http.clone());
            tasks.spawn(async move {
                let kind = art.kind;
                let result = pipeline::prepare(store, http, art, Limits::default(), progress).await;
                result.map(|p| (kind, p))
            });
        }
        let mut term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
        let mut int = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
        let mut hup = signal(SignalKind::hangup()).context("cannot watch SIGHUP")?;
        let mut prepared = Vec::new();
        loop {
            let stop = tokio::select! {
                next = tasks.join_next() => match next {
                    None => break,
                    Some(Ok(Ok(p))) => { prepared.push(p); continue; }
                    Some(Ok(Err(e))) => Err(anyhow::Error::from(e)),
                    Some(Err(join)) => Err(anyhow::anyhow!("a download task failed: {join}")),
                },
                _ = term.recv() => Ok((libc::SIGTERM, "SIGTERM")),
                _ = int.recv() => Ok((libc::SIGINT, "SIGINT")),
                _ = hup.recv() => Ok((libc::SIGHUP, "SIGHUP")),
            };
            // Cancel the rest and wait until their cleanup (staging dirs) has run.
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
            return Err(match stop {
                Err(e) => e,
                Ok((signal, name)) => Interrupted {
                    signal,
                    name,
                    kept: kept_partials(&store, &urls),
                }
                .into(),
            });
        }
        for p in &bars_of {
            bars.finish(p);
        }
        for (kind, p) in &prepared {
            if p.timings.skipped_devices > 0 {
                eprintln!(
                    "vrun: the {} at {} holds {} device nodes or fifos; skipped (LXC creates /dev)",
                    kind.as_str(),
                    p.timings.url,
                    p.timings.skipped_devices
                );
            }
        }
        Ok(prepared)
    })
}

/// What an interrupted setup leaves for the next one to resume, for its last message.
fn kept_partials(store: &Store, urls: &[(String, String)]) -> String {
    let kept: Vec<String> = urls
        .iter()
        .filter_map(|(url, shown)| {
            let n = store.partial_bytes(url);
            (n > 0).then(|| format!("{n} bytes of {shown}"))
        })
        .collect();
    if kept.is_empty() {
        return "no partial download was kept".to_string();
    }
    format!("kept {} for the next setup to resume", kept.join(" and "))
}

fn timings_json(started: Instant, prepared: &[(LayerKind, Prepared)]) -> String {
    let mut obj = serde_json::Map::new();
    obj.insert(
        "total_s".into(),
        serde_json::json!(started.elapsed().as_secs_f64()),
    );
    for (kind, p) in prepared {
        let t: &ArtifactTimings = &p.timings;
        obj.insert(
            kind.as_str().into(),
            serde_json::to_value(t).expect("timings serialize"),
        );
    }
    serde_json::Value::Object(obj).to_string()
}
