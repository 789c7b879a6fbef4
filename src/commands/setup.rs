//! `vrun setup FILE`: validate everything, then create the proc directory and its files.
//!
//! Order matters: lock, parse, name, owner, and render all three files in memory first;
//! only when all of that succeeded is anything created under `$VR_ROOT`, so bad input
//! leaves the host as it was. Running setup again keeps `upper/` (the app's own writes)
//! and rewrites the three files.

use std::process::ExitCode;

use anyhow::bail;
use vrun::envfiles;
use vrun::paths::Root;
use vrun::state::{ProcState, STATE_VERSION};

use crate::cli::SetupArgs;

pub fn setup(root: &Root, args: &SetupArgs) -> anyhow::Result<ExitCode> {
    let file = &args.proc.file;
    let _lock = super::lock(file)?;
    let (config, name) = super::load(file)?;
    let owner = config.owner()?;
    let me = nix::unistd::Uid::effective();
    if !me.is_root() && owner.uid != me.as_raw() {
        bail!(
            "{}: only root can set up a proc that runs as {} (uid {}); this is uid {me}",
            file.display(),
            owner.user,
            owner.uid
        );
    }
    if let Some(url) = config.build_url.as_ref().or(config.image_url.as_ref()) {
        bail!(
            "{}: downloading builds and images ({url}) is not implemented in this build",
            file.display()
        );
    }
    let Some(command) = &config.cmd else {
        bail!(
            "{}: no cmd key; a proc_name resolved from the build's Procfile needs a build_url",
            file.display()
        );
    };
    let files = envfiles::render(&config, command, &|var| std::env::var_os(var))?;

    for warning in &files.warnings {
        eprintln!("WARNING: {warning}");
    }
    let proc = root.proc(&name);
    envfiles::create_proc_dirs(&proc)?;
    envfiles::write_files(&proc.upper(), &files, &owner)?;
    let state = ProcState {
        version: STATE_VERSION,
        build_layer: None,
        image_layer: None,
        uid: owner.uid,
        gid: owner.gid,
    };
    state.save(&proc.state())?;
    eprintln!("vrun: {name} is set up in {}", proc.dir.display());
    Ok(ExitCode::SUCCESS)
}
