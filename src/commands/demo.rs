//! `vrun demo [--keep] [--host-rootfs]`: the whole deploy of the embedded sample app; see `vrun::demo`.

use std::process::ExitCode;

use anyhow::Context;
use vrun::demo::DemoOptions;
use vrun::paths::Root;

use crate::cli::DemoArgs;

pub fn demo(root: Option<Root>, args: &DemoArgs) -> anyhow::Result<ExitCode> {
    let vrun = std::env::current_exe().context("cannot find the vrun binary to run the steps")?;
    vrun::demo::run(&DemoOptions {
        vrun,
        root: root.map(|r| r.dir().to_path_buf()),
        keep: args.keep,
        host_rootfs: args.host_rootfs,
    })?;
    Ok(ExitCode::SUCCESS)
}
