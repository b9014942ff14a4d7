//! The integration suite: one binary (one link step on a 2-core CI). Every test runs the real
//! code against real SQLite files and the simulators over loopback.

mod answers;
mod cli;
mod crash;
mod helpers;
mod secrets;
mod service;
mod sync;
