//! The command line (clap). Names and flags are a public interface: see DESIGN.md.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use crate::domain::Kind;

#[derive(Debug, Parser)]
#[command(
    name = "pendo-sync",
    version,
    about = "Keeps Pendo visitor and account metadata in step with Salesforce or HubSpot."
)]
pub struct Cli {
    /// The configuration file (TOML). Every key can be overridden with PENDO_SYNC__<SECTION>__<KEY>.
    #[arg(
        long,
        global = true,
        env = "PENDO_SYNC_CONFIG",
        default_value = "/etc/pendo-sync/config.toml"
    )]
    pub config: PathBuf,

    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Pretty)]
    pub log_format: LogFormat,

    /// More logging (-v debug, -vv trace). RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count, conflicts_with = "quiet")]
    pub verbose: u8,

    /// Less logging (warnings and errors only).
    #[arg(short, long, global = true)]
    pub quiet: bool,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Pretty,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Table,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KindArg {
    Visitor,
    Account,
}

impl From<KindArg> for Kind {
    fn from(k: KindArg) -> Kind {
        match k {
            KindArg::Visitor => Kind::Visitor,
            KindArg::Account => Kind::Account,
        }
    }
}

/// Outbox states, plus `invalid` for records set aside before they reached the outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum QueueStateArg {
    /// Written by a cycle whose pull has not completed: waits for the guard.
    Staged,
    Pending,
    /// Held by the guard: waits for `holds approve|reject`.
    Held,
    Unmatched,
    Dead,
    Invalid,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// The service: scheduled incremental cycles, periodic reconciles, the outbox worker and the
    /// admin port (health, metrics, status, resync). Stops cleanly on SIGTERM/SIGINT.
    Run,
    /// One scheduled step of `run`: an incremental cycle per mapping (a reconcile instead when
    /// schedule.reconcile_interval has passed), then drain the outbox, then exit (cron-friendly).
    Sync {
        /// Only this mapping.
        #[arg(long)]
        mapping: Option<String>,
        /// Print what would be pushed; write nothing anywhere.
        #[arg(long)]
        dry_run: bool,
        /// How long to wait for another process writing to the same state file (then exit 1).
        #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
        wait_lock: std::time::Duration,
    },
    /// Full pull: push every mapped value whatever the shadow says, and clear records gone from the CRM.
    Resync {
        #[arg(long)]
        mapping: Option<String>,
        #[arg(long, value_enum)]
        kind: Option<KindArg>,
        /// When handed to a running service: return once it accepted the request.
        #[arg(long)]
        no_wait: bool,
        /// Print what would be pushed; write nothing anywhere.
        #[arg(long)]
        dry_run: bool,
        /// How long to wait for a `sync` writing to the same state file (then exit 1).
        #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
        wait_lock: std::time::Duration,
    },
    /// Dry run: a field-level drift report between the CRM, the shadow copy and (optionally) Pendo. Writes nothing.
    Audit(crate::audit::AuditArgs),
    /// Watermarks, last runs, outbox depth by state, oldest pending change, set-aside records, quota use.
    Status {
        #[arg(long, value_enum, default_value_t = OutputFormat::Table)]
        format: OutputFormat,
    },
    /// The provenance of Pendo's values for one id: source, confirmed value, queue, history.
    Why {
        #[arg(value_enum)]
        kind: KindArg,
        /// The Pendo visitor or account id.
        id: String,
        /// Only this Pendo field.
        #[arg(long)]
        field: Option<String>,
        /// How many events to list, newest first.
        #[arg(long, default_value_t = crate::why::DEFAULT_LIMIT)]
        limit: u32,
        /// Also read the CRM record and Pendo's values now (a few rate-limited GETs).
        #[arg(long)]
        live: bool,
        #[arg(long, value_enum, default_value_t = OutputFormat::Table)]
        format: OutputFormat,
    },
    /// Inspect or act on the outbox.
    Queue {
        #[command(subcommand)]
        action: QueueAction,
    },
    /// Changes the guard held: list, show one, approve or reject (with or without a running service).
    Holds {
        #[command(subcommand)]
        action: Option<HoldsAction>,
    },
    /// Validate the config and verify credentials, fields and types against Pendo and the CRMs.
    Check,
    /// Exit 0 if the running service's /readyz answers 200, else 1 (for container health checks).
    Healthcheck,
    /// Start the built-in simulators, sync, change some CRM records, sync again, audit; no config needed.
    Demo,
    /// Run the simulators alone (Pendo, Salesforce, HubSpot on loopback) to try a config against.
    Simulate {
        /// Address for the Pendo simulator; Salesforce and HubSpot take the next two ports.
        #[arg(long, default_value = "127.0.0.1:9101")]
        listen: std::net::SocketAddr,
    },
}

#[derive(Debug, clap::Args)]
pub struct QueueSelector {
    #[arg(long, value_enum)]
    pub state: Option<QueueStateArg>,
    #[arg(long, value_enum)]
    pub kind: Option<KindArg>,
    /// A Pendo id (outbox) or a CRM record id (invalid records).
    #[arg(long)]
    pub id: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum QueueAction {
    /// List outbox rows (and set-aside records).
    List {
        #[command(flatten)]
        select: QueueSelector,
        #[arg(long, default_value_t = 100)]
        limit: u32,
        #[arg(long, value_enum, default_value_t = OutputFormat::Table)]
        format: OutputFormat,
    },
    /// Make matching rows pending and due now.
    Retry {
        #[command(flatten)]
        select: QueueSelector,
    },
    /// Delete matching rows: these changes will not be sent.
    Drop {
        #[command(flatten)]
        select: QueueSelector,
    },
}

#[derive(Debug, Subcommand)]
pub enum HoldsAction {
    /// Holds, newest first (open and decided).
    List {
        #[arg(long, value_enum, default_value_t = OutputFormat::Table)]
        format: OutputFormat,
    },
    /// What tripped one, its counts per field and a sample of its changes.
    Show {
        id: i64,
        #[arg(long, value_enum, default_value_t = OutputFormat::Table)]
        format: OutputFormat,
    },
    /// Makes its values pending: the next writer pass sends them.
    Approve {
        id: i64,
        /// Why (recorded with who and when).
        #[arg(long)]
        reason: Option<String>,
    },
    /// Drops its values; the next reconcile finds the same difference again unless the CRM or
    /// the config changed.
    Reject {
        id: i64,
        /// Why (recorded with who and when).
        #[arg(long)]
        reason: Option<String>,
    },
}
