//! The commands behind the CLI: each loads what it needs, does its work, prints a readable
//! report on stdout (logs go to stderr) and returns an exit code.

use std::sync::Arc;
use std::time::Duration;

use crate::app::{App, AppError, SyncReport};
use crate::cli::{
    Cli, Command, HoldsAction, KindArg, OutputFormat, QueueAction, QueueSelector, QueueStateArg,
};
use crate::config::Settings;
use crate::connectors::PullSpec;
use crate::domain::{FieldType, Kind, Value};
use crate::engine::Mode;
use crate::store::{QueueFilter, QueueState, Store};

/// Runs a parsed command line; returns the process exit code.
pub async fn run(cli: Cli) -> Result<u8, AppError> {
    // The simulators need no configuration file.
    match cli.command {
        Command::Demo => return crate::demo::demo().await,
        Command::Simulate { listen } => return crate::demo::simulate(listen).await,
        _ => {}
    }
    let settings = Arc::new(Settings::load(&cli.config)?);
    match cli.command {
        Command::Sync {
            mapping,
            dry_run,
            wait_lock,
        } => {
            sync(
                settings,
                mapping.as_deref(),
                Mode::Incremental,
                None,
                dry_run,
                wait_lock,
            )
            .await
        }
        Command::Run => crate::run::run(settings).await,
        Command::Healthcheck => crate::admin::healthcheck(&settings).await,
        Command::Resync {
            mapping,
            kind,
            no_wait,
            dry_run,
            wait_lock,
        } => {
            if let Some(name) = mapping.as_deref() {
                settings.mapping(name)?;
            }
            // A service holding the state file owns the outbox: hand it the request. Dry runs
            // write nothing, so they can run beside it. A `sync` holding it is waited for.
            if !dry_run
                && let Some(holder) = crate::lock::holder(&settings.state.path)
                && holder.role.as_deref() == Some("run")
            {
                return crate::admin::hand_off_resync(
                    &settings,
                    mapping.as_deref(),
                    kind,
                    no_wait,
                    holder.pid,
                )
                .await;
            }
            // On PostgreSQL a leader `run` (on any host) is found by its lease, and the request
            // goes through the state: the leader carries it out.
            if !dry_run && settings.state.is_postgres() {
                let store = Store::open_settings(&settings.state).await?;
                let leader = match store.postgres() {
                    Some(pg) => pg.lease_holder().await?,
                    None => None,
                };
                if let Some(holder) = leader.filter(|h| {
                    h.expires_in_ms > 0
                        && crate::lock::parse_lease_holder(&h.holder).role.as_deref() == Some("run")
                }) {
                    return resync_through_state(
                        &settings,
                        &store,
                        mapping.as_deref(),
                        kind,
                        no_wait,
                        &holder.holder,
                    )
                    .await;
                }
                store.close().await;
            }
            sync(
                settings,
                mapping.as_deref(),
                Mode::Resync,
                kind,
                dry_run,
                wait_lock,
            )
            .await
        }
        Command::Audit(args) => crate::audit::run(settings, args).await,
        Command::Status { format } => status(&settings, format).await,
        Command::Queue { action } => queue(&settings, action).await,
        Command::Holds { action } => {
            holds(
                &settings,
                action.unwrap_or(HoldsAction::List {
                    format: OutputFormat::Table,
                }),
            )
            .await
        }
        Command::Check => check(settings).await,
        Command::Why {
            kind,
            id,
            field,
            limit,
            live,
            format,
        } => {
            let options = crate::why::WhyOptions { field, limit, live };
            why(&settings, kind.into(), &id, &options, format).await
        }
        Command::Demo | Command::Simulate { .. } => unreachable!("handled above"),
    }
}

async fn sync(
    settings: Arc<Settings>,
    mapping: Option<&str>,
    mode: Mode,
    kind: Option<KindArg>,
    dry_run: bool,
    wait_lock: std::time::Duration,
) -> Result<u8, AppError> {
    if let Some(name) = mapping {
        settings.mapping(name)?;
    }
    // One writer per outbox, for the whole run (cycles and drain). A dry run writes nothing.
    let role = if mode == Mode::Resync {
        "resync"
    } else {
        "sync"
    };
    // A SQLite file's lock is taken before the file is opened (a second writer is told so
    // before it touches the file); PostgreSQL's lease is a row in the database it opens.
    let lock = if dry_run || settings.state.is_postgres() {
        None
    } else {
        Some(
            crate::lock::InstanceLock::acquire_waiting(&settings.state.path, role, wait_lock)
                .await?,
        )
    };
    let app = if dry_run {
        App::open_dry_run(settings.clone()).await?
    } else {
        App::open_configured(settings.clone()).await?
    };
    let lock = match lock {
        Some(lock) => Some(lock),
        None if !dry_run => Some(
            crate::lock::InstanceLock::acquire_for(&app.store, &settings.state, role, wait_lock)
                .await?,
        ),
        None => None,
    };
    if let Some(lock) = lock {
        app.hold_lock(lock);
    }
    if dry_run {
        print_config_plan(&settings, &app.store).await?;
    }
    let cancel = crate::shutdown::shutdown_token();
    let kind: Option<Kind> = kind.map(Into::into);
    let mut report = SyncReport::default();
    for m in app.mappings(mapping)? {
        if kind.is_some_and(|k| k != m.kind) {
            continue;
        }
        let progress = CliProgress::new(mode);
        let r = if mode == Mode::Incremental {
            // `sync` is one scheduled step of `run`: a reconcile when one is due.
            app.sync_scheduled(Some(&m.name), dry_run, &cancel, &progress)
                .await?
        } else {
            app.sync(Some(&m.name), mode, dry_run, &cancel, &progress)
                .await?
        };
        progress.finish();
        if mode == Mode::Resync && !dry_run && r.failed.is_empty() {
            crate::schedule::ReconcileRecord::record(&app.store, &m.name, Ok(()), None).await?;
        }
        report.merge(r);
    }
    print_sync_report(&report, dry_run);
    // Exit 4 below: changes wait for a person (`holds approve|reject`), this run's or an
    // earlier one's still open for these mappings (read on the app's own store, before it
    // closes).
    let held = report
        .cycles
        .iter()
        .any(|c| matches!(c.guard, Some(crate::store::GuardOutcome::Held { .. })));
    let open: Vec<_> = if dry_run {
        Vec::new()
    } else {
        let names: Vec<&str> = report.cycles.iter().map(|c| c.mapping.as_str()).collect();
        app.store
            .holds(true)
            .await?
            .into_iter()
            .filter(|h| names.contains(&h.mapping.as_str()))
            .collect()
    };
    // Notifications (a hold, a paused writer) go out before the process ends.
    app.notifier.flush(Duration::from_secs(15)).await;
    app.release_lock().await;
    app.store.close().await;
    if report.drain.as_ref().is_some_and(|d| d.paused.is_some()) || !report.failed.is_empty() {
        return Ok(1);
    }
    if !held {
        for h in &open {
            println!(
                "{:<20} hold {} is still open ({} values wait): `pendo-sync holds show {}`",
                h.mapping, h.id, h.held_values, h.id
            );
        }
    }
    Ok(if held || !open.is_empty() { 4 } else { 0 })
}

/// Progress of a cycle run from the command line: an in-place line on a terminal (resyncs and
/// first syncs of a large CRM take a while), a log line every 50 pages otherwise.
struct CliProgress {
    terminal: bool,
    label: &'static str,
    shown: std::sync::atomic::AtomicBool,
}

impl CliProgress {
    fn new(mode: Mode) -> CliProgress {
        use std::io::IsTerminal;
        CliProgress {
            terminal: std::io::stderr().is_terminal(),
            label: mode.as_str(),
            shown: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn finish(&self) {
        if self.shown.load(std::sync::atomic::Ordering::Relaxed) {
            eprintln!();
        }
    }
}

impl crate::engine::Progress for CliProgress {
    fn page(&self, r: &crate::engine::CycleReport) {
        if self.terminal {
            use std::io::Write;
            self.shown.store(true, std::sync::atomic::Ordering::Relaxed);
            let mut err = std::io::stderr().lock();
            let _ = write!(
                err,
                "\r{} {}: {} records read, {} changes, {} set aside",
                self.label, r.mapping, r.pulled, r.changes, r.invalid
            );
            let _ = err.flush();
        } else if r.pages.is_multiple_of(50) {
            tracing::info!(mapping = %r.mapping, pulled = r.pulled, changes = r.changes, "Cycle in progress.");
        }
    }
}

fn print_sync_report(report: &SyncReport, dry_run: bool) {
    for c in &report.cycles {
        println!(
            "{:<20} pulled {:>8}  changes {:>8}  set aside {:>6}  ambiguous {:>4}  cleared {:>4}",
            c.mapping, c.pulled, c.changes, c.invalid, c.ambiguous, c.cleared_orphans
        );
        match &c.guard {
            Some(crate::store::GuardOutcome::Held {
                hold_id,
                new,
                reason,
                values,
            }) => println!(
                "{:<20} HELD by the guard ({}hold {hold_id}): {reason}; {values} values wait for a person: `pendo-sync holds show {hold_id}`",
                c.mapping,
                if *new { "new " } else { "joined open " },
            ),
            Some(crate::store::GuardOutcome::Passed { values }) if *values > 0 => {
                println!("{:<20} guard passed {values} values", c.mapping)
            }
            _ => {}
        }
        if let Some(reason) = &c.would_hold {
            println!("{:<20} would hold: {reason}", c.mapping);
        }
        if dry_run {
            for ch in &c.dry_run_changes {
                let v = Value::from_stored(&ch.value)
                    .map(|v| v.display())
                    .unwrap_or_else(|e| e);
                println!(
                    "  would set {} {} {} = {}",
                    ch.kind, ch.pendo_id, ch.field, v
                );
            }
        }
    }
    for (m, e) in &report.failed {
        println!("{m:<20} FAILED: {e}");
    }
    if let Some(d) = &report.drain {
        println!(
            "pendo: {} requests, {} records confirmed, {} unmatched, {} failed",
            d.requests, d.confirmed, d.unmatched, d.failed
        );
        if let Some(reason) = &d.paused {
            println!("pendo: writer PAUSED: {reason}");
        }
    }
    if dry_run {
        println!("dry run: nothing was written or sent");
    }
}

// ---- status --------------------------------------------------------------------------------

use crate::status::{iso, print_hold, status_report};

async fn status(settings: &Settings, format: OutputFormat) -> Result<u8, AppError> {
    let store = Store::open_settings_read_only(&settings.state).await?;
    let report = status_report(settings, &store).await?;
    match format {
        OutputFormat::Json => println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("status serializes")
        ),
        OutputFormat::Table => {
            println!("state file      {}", report.state_file);
            println!(
                "writer          {}",
                report
                    .writer_paused
                    .as_deref()
                    .map_or("running".to_owned(), |r| format!("PAUSED: {r}"))
            );
            let ids = |state: &str| report.outbox_ids.get(state).copied().unwrap_or(0);
            println!(
                "outbox          pending {} values ({} ids)  unmatched {} values ({} ids)  dead {} values ({} ids)",
                report.outbox["pending"],
                ids("pending"),
                report.outbox["unmatched"],
                ids("unmatched"),
                report.outbox["dead"],
                ids("dead")
            );
            if let Some(s) = report.oldest_pending_seconds {
                println!("oldest pending  {s:.0}s ago");
            }
            println!(
                "set aside       {} records (see `queue list --state invalid`)",
                report.invalid_records
            );
            println!(
                "history         {} events, kept {} (`pendo-sync why account|visitor ID`)",
                report.history.events, report.history.retention
            );
            if report.outbox["staged"] > 0 || report.outbox["held"] > 0 {
                println!(
                    "guard           staged {} values  held {} values ({} ids)",
                    report.outbox["staged"],
                    report.outbox["held"],
                    ids("held")
                );
            }
            for h in &report.open_holds {
                println!(
                    "HOLD {:<10} mapping {}: {} ({} values, since {}; `pendo-sync holds show {}`)",
                    h.id, h.mapping, h.reason, h.held_values, h.created_at, h.id
                );
            }
            for m in &report.mappings {
                let run = m.last_run.as_ref().map_or("never run".to_owned(), |r| {
                    format!(
                        "{} {} at {}: pulled {}, changes {}{}",
                        r.mode,
                        if r.ok == Some(true) { "ok" } else { "FAILED" },
                        iso(r.started_at),
                        r.pulled,
                        r.changes,
                        r.error
                            .as_deref()
                            .map(|e| format!(" ({e})"))
                            .unwrap_or_default()
                    )
                });
                println!("mapping {:<14} {}", m.name, run);
                if let Some(r) = m.reconcile.as_ref().filter(|r| r.failures > 0) {
                    println!(
                        "                RECONCILE FAILING: {} in a row, last at {}: {}{}",
                        r.failures,
                        r.failed_at.as_deref().unwrap_or("?"),
                        r.last_error.as_deref().unwrap_or(""),
                        r.retry_at
                            .as_deref()
                            .map(|at| format!(" (next try {at})"))
                            .unwrap_or_default()
                    );
                } else if let Some(at) = m
                    .reconcile
                    .as_ref()
                    .and_then(|r| r.last_success_at.as_deref())
                {
                    println!("                last reconcile {at}");
                }
                println!(
                    "                watermark {}",
                    m.watermark
                        .as_deref()
                        .unwrap_or("none (next cycle reads everything)")
                );
            }
            for (api, q) in &report.quota {
                println!("quota {api:<10} {q}");
            }
        }
    }
    store.close().await;
    Ok(0)
}

// ---- queue ---------------------------------------------------------------------------------

fn filter(select: &QueueSelector) -> QueueFilter {
    QueueFilter {
        state: match select.state {
            Some(QueueStateArg::Staged) => Some(QueueState::Staged),
            Some(QueueStateArg::Pending) => Some(QueueState::Pending),
            Some(QueueStateArg::Held) => Some(QueueState::Held),
            Some(QueueStateArg::Unmatched) => Some(QueueState::Unmatched),
            Some(QueueStateArg::Dead) => Some(QueueState::Dead),
            Some(QueueStateArg::Invalid) | None => None,
        },
        kind: select.kind.map(Into::into),
        pendo_id: select.id.clone(),
    }
}

async fn queue(settings: &Settings, action: QueueAction) -> Result<u8, AppError> {
    match action {
        QueueAction::List {
            select,
            limit,
            format,
        } => {
            let store = Store::open_settings_read_only(&settings.state).await?;
            let show_outbox = select.state != Some(QueueStateArg::Invalid);
            let show_invalid = matches!(select.state, None | Some(QueueStateArg::Invalid));
            let (rows, outbox_total) = if show_outbox {
                let f = filter(&select);
                (
                    store.outbox_list(&f, limit).await?,
                    store.outbox_count(&f).await?,
                )
            } else {
                (vec![], 0)
            };
            let (invalid, invalid_total) = if show_invalid {
                let all: Vec<_> = store
                    .invalid_records(None)
                    .await?
                    .into_iter()
                    .filter(|r| {
                        select
                            .id
                            .as_ref()
                            .is_none_or(|id| *id == r.crm_id || r.pendo_id.as_ref() == Some(id))
                    })
                    .collect();
                let total = all.len() as i64;
                (all.into_iter().take(limit as usize).collect(), total)
            } else {
                (vec![], 0)
            };
            // Say when the list was cut, so nobody takes 100 rows for the whole queue.
            let cut = |shown: usize, total: i64, what: &str| {
                (total > shown as i64)
                    .then(|| format!("{shown} of {total} {what} shown; raise --limit to see more"))
            };
            let notes: Vec<String> = [
                cut(rows.len(), outbox_total, "outbox rows"),
                cut(invalid.len(), invalid_total, "set-aside records"),
            ]
            .into_iter()
            .flatten()
            .collect();
            match format {
                OutputFormat::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "outbox": rows,
                        "outbox_total": outbox_total,
                        "invalid": invalid,
                        "invalid_total": invalid_total,
                    }))
                    .expect("rows serialize")
                ),
                OutputFormat::Table => {
                    for r in &rows {
                        let v = Value::from_stored(&r.value)
                            .map(|v| v.display())
                            .unwrap_or_else(|e| e);
                        println!(
                            "{:<9} {:<7} {:<24} {:<16} {:<24} attempts {:>2}  {}",
                            r.state.as_str(),
                            r.kind,
                            r.pendo_id,
                            r.field,
                            v,
                            r.attempts,
                            r.last_error.as_deref().unwrap_or("")
                        );
                    }
                    for r in &invalid {
                        println!("invalid   {:<14} {:<14} {}", r.mapping, r.reason, r.detail);
                    }
                    if rows.is_empty() && invalid.is_empty() {
                        println!("nothing matches");
                    }
                    for note in &notes {
                        println!("{note}");
                    }
                }
            }
            store.close().await;
        }
        QueueAction::Retry { select } => {
            let store = Store::open_settings(&settings.state).await?;
            let n = store
                .outbox_retry(&filter(&select), &format!("queue retry by {}", os_user()))
                .await?;
            println!("{n} outbox rows made pending and due now");
            store.close().await;
        }
        QueueAction::Drop { select } => {
            let store = Store::open_settings(&settings.state).await?;
            let n = if select.state == Some(QueueStateArg::Invalid) {
                store.drop_invalid(None, select.id.as_deref()).await?
            } else {
                store
                    .outbox_drop(&filter(&select), &format!("queue drop by {}", os_user()))
                    .await?
            };
            println!("{n} rows dropped");
            store.close().await;
        }
    }
    Ok(0)
}

/// Queues a resync in the state for the leader `holder` to carry out, and follows it there.
async fn resync_through_state(
    settings: &Settings,
    store: &Store,
    mapping: Option<&str>,
    kind: Option<KindArg>,
    no_wait: bool,
    holder: &str,
) -> Result<u8, AppError> {
    let seq = std::sync::atomic::AtomicU64::new(0);
    let job = crate::service::new_resync(settings, mapping, kind.map(Kind::from), &seq)
        .map_err(AppError::Runtime)?;
    store.save_resync(&job).await?;
    let id = job.id.clone();
    println!("resync {id} queued for the leader (pendo-sync {holder})");
    if no_wait {
        println!("follow it with: GET /v1/resync/{id} on any replica's admin port");
        return Ok(0);
    }
    crate::admin::follow_resync(&id, || async {
        match store.resync(&id).await {
            Ok(Some(job)) => Ok(serde_json::to_value(&job).expect("a job serializes")),
            Ok(None) => Err("the job is no longer in the state".into()),
            Err(e) => Err(e.to_string()),
        }
    })
    .await
}

// ---- why -----------------------------------------------------------------------------------

async fn why(
    settings: &Settings,
    kind: Kind,
    id: &str,
    options: &crate::why::WhyOptions,
    format: OutputFormat,
) -> Result<u8, AppError> {
    let report = if options.live
        && let Some(holder) = crate::lock::holder(&settings.state.path)
        && holder.role.as_deref() == Some("run")
    {
        crate::admin::why_via_service(settings, kind, id, options).await?
    } else {
        why_here(settings, kind, id, options).await?
    };
    match format {
        OutputFormat::Json => println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("the report serializes")
        ),
        OutputFormat::Table => print!("{}", crate::why::render_table(&report)),
    }
    Ok(if report.live_failed { 1 } else { 0 })
}

/// `why` in this process. Live reads log in with the state's refresh tokens (and keep a token
/// a CRM rotates), as `sync` would.
async fn why_here(
    settings: &Settings,
    kind: Kind,
    id: &str,
    options: &crate::why::WhyOptions,
) -> Result<crate::why::WhyReport, AppError> {
    // Read-only first: a missing or older state file is said so, never created or upgraded.
    let mut store = Store::open_settings_read_only(&settings.state).await?;
    if options.live {
        // Writable only for the connectors' rotated tokens and quota readings.
        store.close().await;
        store = Store::open_settings(&settings.state).await?;
    }
    let live = if options.live {
        let kv: crate::connectors::SharedKv = Arc::new(store.clone());
        let connectors = crate::connectors::build(settings, Some(kv))?;
        let key = settings
            .pendo
            .integration_key_source
            .resolve("pendo.integration_key")?;
        Some((
            connectors,
            crate::pendo::PendoClient::new(&settings.pendo, key),
        ))
    } else {
        None
    };
    let sources = live
        .as_ref()
        .map(|(connectors, pendo)| crate::why::LiveSources { connectors, pendo });
    let result = crate::why::explain(settings, &store, kind, id, options, sources).await;
    store.close().await;
    result.map_err(|e| AppError::Runtime(e.to_string()))
}

// ---- holds ---------------------------------------------------------------------------------

/// Who decides a hold from the command line: the OS user.
fn os_user() -> String {
    std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown user".to_owned())
}

async fn holds(settings: &Settings, action: HoldsAction) -> Result<u8, AppError> {
    match action {
        HoldsAction::List { format } => {
            let store = Store::open_settings_read_only(&settings.state).await?;
            let holds = store.holds(false).await?;
            match format {
                OutputFormat::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({ "holds": holds }))
                        .expect("holds serialize")
                ),
                OutputFormat::Table => {
                    if holds.is_empty() {
                        println!("no holds");
                    }
                    for h in &holds {
                        println!(
                            "{:<6} {:<9} {:<16} {:>8} values  {}  {}",
                            h.id,
                            h.state,
                            h.mapping,
                            h.held_values,
                            iso(h.created_at),
                            h.reason
                        );
                    }
                }
            }
            store.close().await;
            Ok(0)
        }
        HoldsAction::Show { id, format } => {
            let store = Store::open_settings_read_only(&settings.state).await?;
            let hold = store.hold(id).await?;
            store.close().await;
            let Some(h) = hold else {
                return Err(AppError::Runtime(format!("no hold {id}")));
            };
            match format {
                OutputFormat::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&h).expect("a hold serializes")
                ),
                OutputFormat::Table => print_hold(&h),
            }
            Ok(0)
        }
        HoldsAction::Approve { id, reason } => decide(settings, id, true, reason).await,
        HoldsAction::Reject { id, reason } => decide(settings, id, false, reason).await,
    }
}

/// `holds approve|reject`: acts on the state file, with or without a running service (its
/// writer picks approved values up within a poll interval).
async fn decide(
    settings: &Settings,
    id: i64,
    approve: bool,
    reason: Option<String>,
) -> Result<u8, AppError> {
    if !settings.state.path.exists() {
        return Err(AppError::Runtime(format!(
            "no hold {id}: the state file {} does not exist",
            settings.state.path.display()
        )));
    }
    let store = Store::open_settings(&settings.state).await?;
    let result = store
        .decide_hold(id, approve, &os_user(), reason.as_deref())
        .await;
    store.close().await;
    let h = result.map_err(|e| AppError::Runtime(e.to_string()))?;
    if approve {
        println!(
            "hold {id} approved: its values are pending; the next writer pass sends them (`pendo-sync sync`, or a running service within a poll interval)"
        );
    } else {
        println!(
            "hold {id} rejected: its values were dropped; the next reconcile finds the same difference again unless the CRM or the config changed"
        );
    }
    print_hold(&h);
    Ok(0)
}

// ---- check ---------------------------------------------------------------------------------

/// One line of the check report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub ok: bool,
    pub subject: String,
    pub detail: String,
}

/// Pendo side of `check`: the key is valid with write access, and every mapped field exists in
/// the kind's custom schema with a type that can hold the mapping's values.
pub async fn check_pendo(settings: &Settings, client: &crate::pendo::PendoClient) -> Vec<Finding> {
    let mut out = Vec::new();
    match client.verify_token().await {
        Ok(t) if t.valid && t.write_access => out.push(Finding {
            ok: true,
            subject: "pendo integration key".into(),
            detail: format!("valid, with write access ({})", client.base()),
        }),
        Ok(t) if t.valid => out.push(Finding {
            ok: false,
            subject: "pendo integration key".into(),
            detail: "valid but READ-ONLY: enable \"Allow Write Access\" on the key in Pendo".into(),
        }),
        Ok(_) => out.push(Finding {
            ok: false,
            subject: "pendo integration key".into(),
            detail: "Pendo says the key is not valid".into(),
        }),
        Err(e) => {
            out.push(Finding {
                ok: false,
                subject: "pendo integration key".into(),
                detail: e.to_string(),
            });
            return out;
        }
    }
    for kind in Kind::ALL {
        let fields: Vec<(&str, &str, FieldType)> = settings
            .mappings
            .iter()
            .filter(|m| m.kind == kind)
            .flat_map(|m| {
                m.fields
                    .iter()
                    .map(move |(k, f)| (m.name.as_str(), k.as_str(), f.field_type))
            })
            .collect();
        if fields.is_empty() {
            continue;
        }
        let schema = match client.custom_schema(kind).await {
            Ok(s) => s,
            Err(e) => {
                out.push(Finding {
                    ok: false,
                    subject: format!("pendo {kind} schema"),
                    detail: e.to_string(),
                });
                continue;
            }
        };
        for (mapping, field, ty) in fields {
            let subject = format!("pendo {kind} field {field} (mapping {mapping})");
            match schema.get(field) {
                None => out.push(Finding {
                    ok: false,
                    subject,
                    detail: format!(
                        "not declared in Pendo's {kind} custom fields; add it in Settings > Data Mappings (type {ty})"
                    ),
                }),
                Some(pt) if !ty.compatible_with_pendo(pt) => out.push(Finding {
                    ok: false,
                    subject,
                    detail: format!("Pendo declares it as {pt:?} but the mapping sends {ty}"),
                }),
                Some(pt) => out.push(Finding {
                    ok: true,
                    subject,
                    detail: format!("declared as {pt}"),
                }),
            }
        }
    }
    out
}

/// What the configuration changed since the state last saw it (see `reconfigure`).
async fn print_config_plan(
    settings: &Settings,
    store: &crate::store::Store,
) -> Result<(), AppError> {
    for line in crate::reconfigure::plan(settings, store).await?.lines() {
        println!("config change   {line}");
    }
    Ok(())
}

async fn check(settings: Arc<Settings>) -> Result<u8, AppError> {
    println!("config          ok ({} mappings)", settings.mappings.len());
    let app = App::open_configured(settings.clone()).await?;
    print_config_plan(&settings, &app.store).await?;
    let mut findings = check_pendo(&settings, &app.pendo).await;
    for m in &settings.mappings {
        let spec = PullSpec::for_mapping(m, None, settings.schedule.overlap);
        match app.connector(m.source)?.check(&spec).await {
            Ok(list) => findings.extend(list.into_iter().map(|f| Finding {
                ok: f.ok,
                subject: format!("{} {} (mapping {})", m.source.as_str(), f.subject, m.name),
                detail: f.detail,
            })),
            Err(e) => findings.push(Finding {
                ok: false,
                subject: format!("{} (mapping {})", m.source.as_str(), m.name),
                detail: e.to_string(),
            }),
        }
    }
    let failed = findings.iter().filter(|f| !f.ok).count();
    for f in &findings {
        println!(
            "{} {} — {}",
            if f.ok { "ok  " } else { "FAIL" },
            f.subject,
            f.detail
        );
    }
    println!("{} checks, {} failed", findings.len(), failed);
    app.store.close().await;
    Ok(if failed == 0 { 0 } else { 1 })
}
