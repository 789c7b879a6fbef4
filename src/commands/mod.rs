//! The commands, each a few lines over the library modules (youki's shape): they turn
//! already-parsed arguments into one library call and hand back an exit code. Argument
//! parsing (clap) and the proc.yaml → [`crate::lxc::LxcProc`] step live in `main.rs`.

pub mod run;
pub mod shell;
pub mod uptest;
