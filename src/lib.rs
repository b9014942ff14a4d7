//! pendo-sync keeps Pendo visitor and account metadata in step with Salesforce or HubSpot:
//! minutes-fresh, sending only what changed, never losing an update.
//!
//! # Layout
//!
//! The modules follow the data's path:
//!
//! - [`connectors`]: the CRM seam ([`connectors::Connector`]) and its implementations.
//! - [`mapping`]: CRM fields → typed, canonical Pendo values; Pendo ids; invalid records.
//! - [`diff`]: field-level changes against the shadow copy (pure, no I/O).
//! - [`digest`]: value and id digests; lets a reconcile skip records that did not change.
//! - [`store`]: the SQLite state file: shadow, outbox, watermarks, run history.
//! - [`pendo`]: the Pendo client and the outbox writer (batching, limiter, retries, outcomes).
//! - [`guard`]: the guard's decision: a cycle's changes within limits, or held for a person.
//! - [`engine`]: one sync cycle per mapping: pull → map → diff → outbox, then drain.
//! - [`audit`]: the dry-run drift report: CRM against the shadow and (optionally) Pendo.
//! - [`why`]: one id's provenance: source, confirmed value, queue, history; live checks.
//! - [`schedule`]: when a mapping reconciles (interval, backoff after a failure).
//! - [`service`]: `pendo-sync run`: the scheduled cycles, the outbox worker, resync jobs, readiness.
//! - [`admin`]: the admin port (health, metrics, status, resync) and its CLI clients.
//! - [`lock`]: the instance lock: one writing process per state file.
//! - [`config`], [`telemetry`], [`cli`], [`commands`]: settings, logs, the command line.
//! - [`sim`]: loopback simulators of Pendo, Salesforce and HubSpot.
//! - [`domain`]: kinds, field types and the canonical [`domain::Value`].

pub mod admin;
pub mod app;
pub mod audit;
pub mod cli;
pub mod commands;
pub mod config;
pub mod connectors;
pub mod demo;
pub mod diff;
pub mod digest;
pub mod domain;
pub mod engine;
pub mod guard;
pub mod http;
pub mod limiter;
pub mod lock;
pub mod mapping;
pub mod metrics;
pub mod notify;
pub mod pendo;
pub mod reconfigure;
pub mod run;
pub mod schedule;
pub mod service;
pub mod shutdown;
pub mod sim;
pub mod status;
pub mod store;
pub mod telemetry;
pub mod why;
