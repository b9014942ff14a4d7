//! The integration suite: one binary (one link step on a 2-core CI). Every test runs the real
//! code against real SQLite files and the simulators over loopback.

mod admin_port;
mod answers;
mod audit;
mod bad_input;
mod browser;
mod cli;
mod console;
mod crash;
mod crm_harness;
mod digest;
mod ecosystem;
mod faults;
mod guard;
mod guard_counting;
mod helpers;
mod history;
mod outage;
mod pg;
mod races;
mod reconfigure;
mod replicas;
mod secrets;
mod security;
mod service;
mod sync;
mod trust;
mod unknown_ids;
mod upgrades;
