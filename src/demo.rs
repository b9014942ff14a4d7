//! `pendo-sync demo` and `pendo-sync simulate`: the three simulators on loopback, seeded, and
//! (for the demo) a first sync, a round of CRM edits, a second sync that sends only what changed,
//! and a dry-run audit. Nothing leaves the machine; no config is needed.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use tokio_util::sync::CancellationToken;

use crate::app::{App, AppError};
use crate::config::Settings;
use crate::domain::Kind;
use crate::engine::Mode;
use crate::sim::SimServer;
use crate::sim::config::{
    Auth, HubspotSection, MappingSection, PendoSection, SalesforceSection, SimConfig,
};
use crate::sim::hubspot::{HubspotSim, HubspotSimConfig};
use crate::sim::pendo::{PendoSim, PendoSimConfig};
use crate::sim::salesforce::{SalesforceSim, SalesforceSimConfig};

const PENDO_KEY: &str = "demo-integration-key";
const SF_SECRET: &str = "demo-client-secret";

struct Sims {
    pendo: PendoSim,
    salesforce: SalesforceSim,
    hubspot: HubspotSim,
    servers: Vec<SimServer>,
}

async fn start_sims(first: SocketAddr) -> std::io::Result<Sims> {
    let mut schema = Vec::new();
    for (f, t) in [
        ("plantier", "string"),
        ("arr", "number"),
        ("owneremail", "string"),
        ("renewaldate", "date"),
        ("isstrategic", "boolean"),
    ] {
        schema.push((Kind::Account, f.to_owned(), t.to_owned()));
    }
    // `accountname` is declared for step 8, where a mapping gains it.
    schema.push((Kind::Account, "accountname".to_owned(), "string".to_owned()));
    for f in ["lifecyclestage", "owneremail", "csmname"] {
        schema.push((Kind::Visitor, f.to_owned(), "string".to_owned()));
    }
    let pendo = PendoSim::new(PendoSimConfig {
        integration_key: PENDO_KEY.into(),
        write_access: true,
        schema,
        rate_limit: None,
        errors_as_strings: false,
    });
    let salesforce = SalesforceSim::new(SalesforceSimConfig {
        client_secret: SF_SECRET.into(),
        ..SalesforceSimConfig::default()
    });
    let hubspot = HubspotSim::new(HubspotSimConfig::default());
    let port = |n: u16| {
        let mut a = first;
        if a.port() != 0 {
            a.set_port(a.port() + n);
        }
        a
    };
    let servers = vec![
        pendo.start(port(0)).await?,
        salesforce.start(port(1)).await?,
        hubspot.start(port(2)).await?,
    ];
    Ok(Sims {
        pendo,
        salesforce,
        hubspot,
        servers,
    })
}

fn config_text(sims: &Sims, state: &std::path::Path) -> String {
    let pendo = PendoSection::new(PENDO_KEY)
        .base_url(sims.servers[0].url())
        .batch_size(500)
        .requests_per_second(50.0)
        .max_in_flight(None)
        .create_missing(true);
    let sf_auth = Auth::client_credentials(SalesforceSimConfig::default().client_id, SF_SECRET);
    let hs_auth = Auth::access_token(HubspotSimConfig::default().access_token);
    SimConfig::new(state, pendo)
        .salesforce(
            SalesforceSection::new(sims.servers[1].url(), sf_auth).requests_per_second(50.0),
        )
        .hubspot(HubspotSection::new(sims.servers[2].url(), hs_auth).requests_per_10s(150))
        .mapping(MappingSection::sf_accounts("sf-accounts").filter("Type = 'Customer'"))
        .mapping(MappingSection::hs_contacts())
        .to_toml()
}

/// `pendo-sync simulate`: serve the simulators until Ctrl-C, printing their URLs and a config.
pub async fn simulate(listen: SocketAddr) -> Result<u8, AppError> {
    let sims = start_sims(listen)
        .await
        .map_err(|e| AppError::Runtime(format!("cannot listen on {listen}: {e}")))?;
    sims.salesforce.seed_demo(200, 300);
    sims.hubspot.seed_demo(50, 300);
    println!("Pendo simulator       {}", sims.servers[0].url());
    println!("Salesforce simulator  {}", sims.servers[1].url());
    println!("HubSpot simulator     {}", sims.servers[2].url());
    println!(
        "\n# A config that points at them (save it and run `pendo-sync --config FILE sync`):\n"
    );
    println!(
        "{}",
        config_text(&sims, std::path::Path::new("./pendo-sync-sim.db"))
    );
    let _ = tokio::signal::ctrl_c().await;
    Ok(0)
}

/// `pendo-sync demo`.
pub async fn demo() -> Result<u8, AppError> {
    let started = Instant::now();
    let sims = start_sims("127.0.0.1:0".parse().expect("address"))
        .await
        .map_err(|e| AppError::Runtime(format!("cannot start the simulators: {e}")))?;
    let accounts = 2_000;
    sims.salesforce.seed_demo(accounts, 3_000);
    sims.hubspot.seed_demo(300, 2_000);
    let dir = std::env::temp_dir().join(format!("pendo-sync-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)
        .map_err(|e| AppError::Runtime(format!("cannot create {}: {e}", dir.display())))?;
    let text = config_text(&sims, &dir.join("state.db"));
    let settings = Arc::new(Settings::from_toml_with_env(&text, HashMap::new())?);
    let app = App::open_configured(settings.clone()).await?;
    let cancel = CancellationToken::new();

    println!(
        "pendo-sync demo: Salesforce ({accounts} accounts), HubSpot (2,000 contacts) and Pendo simulators on loopback\n"
    );
    println!("1. First sync: everything the CRMs hold goes to Pendo");
    let first = app
        .sync(None, Mode::Incremental, false, &cancel, &())
        .await?;
    report(&first, &sims);

    println!("\n2. Nothing changed: a second sync sends Pendo nothing");
    let before = sims.pendo.requests().len();
    let idle = app
        .sync(None, Mode::Incremental, false, &cancel, &())
        .await?;
    // The simulated CRMs stamp every seeded record within the same few seconds, so the
    // incremental's overlap window (which guards against clock skew and late commits) reads them
    // all again: this step shows that re-reading costs no Pendo request.
    println!(
        "   re-read {} records (inside the incremental's overlap window), {} field changes, Pendo requests: {}",
        idle.cycles.iter().map(|c| c.pulled).sum::<u64>(),
        idle.cycles.iter().map(|c| c.changes).sum::<u64>(),
        sims.pendo.requests().len() - before
    );

    println!(
        "\n3. RevOps edits the CRM: 25 plan tiers and 10 ARR figures in Salesforce, 15 lifecycle stages in HubSpot"
    );
    for i in 0..25 {
        sims.salesforce.set_field(
            "Account",
            &crate::sim::salesforce::account_id(i * 7),
            "Plan_Tier__c",
            serde_json::json!("Platinum"),
        );
    }
    for i in 0..10 {
        sims.salesforce.set_field(
            "Account",
            &crate::sim::salesforce::account_id(i * 11 + 3),
            "ARR__c",
            serde_json::json!(999_000.0 + i as f64),
        );
    }
    for i in 0..15u64 {
        sims.hubspot.upsert(
            "contacts",
            5001 + i * 13,
            serde_json::json!({"lifecyclestage": "evangelist"}),
        );
    }
    sims.pendo.reset_requests();
    let second = app
        .sync(None, Mode::Incremental, false, &cancel, &())
        .await?;
    report(&second, &sims);
    let values: usize = sims
        .pendo
        .requests()
        .iter()
        .filter_map(|r| {
            r.body.as_ref()?.as_array().map(|a| {
                a.iter()
                    .map(|e| e["values"].as_object().map_or(0, |v| v.len()))
                    .sum::<usize>()
            })
        })
        .sum();
    println!("   field values sent: {values} (only the changed fields, not whole records)");

    println!(
        "\n4. Someone edits two accounts by hand in Pendo; the audit (a dry run: writes nothing) finds them"
    );
    let edited = [
        crate::sim::salesforce::account_id(1),
        crate::sim::salesforce::account_id(2),
    ];
    sims.pendo.set_value(
        Kind::Account,
        &edited[0],
        "plantier",
        serde_json::json!("Free"),
    );
    sims.pendo
        .set_value(Kind::Account, &edited[1], "arr", serde_json::json!(1));
    let connectors = crate::connectors::build(&settings, None)?;
    let options = crate::audit::AuditOptions {
        against: crate::audit::Against::Pendo,
        ..Default::default()
    };
    let audit = crate::audit::audit(&settings, &connectors, &options).await?;
    for m in &audit.mappings {
        let differing: u64 = m
            .counts
            .iter()
            .filter(|(c, _)| c.is_drift())
            .map(|(_, n)| *n)
            .sum();
        println!(
            "   {:<12} {} records read, {} fields differ",
            m.mapping, m.records, differing
        );
    }
    for row in &audit.rows {
        println!(
            "   {} {} {}: CRM {}, Pendo {} ({})",
            row.class.as_str(),
            row.id,
            row.field,
            row.crm.as_deref().unwrap_or("-"),
            row.pendo.clone().flatten().as_deref().unwrap_or("-"),
            row.note
        );
    }
    let drift = audit.rows.len();

    println!(
        "\n5. Why does Pendo say Free for {}? `pendo-sync why account {} --live --field plantier`:\n",
        edited[0], edited[0]
    );
    let why = crate::why::explain(
        &settings,
        &app.store,
        Kind::Account,
        &edited[0],
        &crate::why::WhyOptions {
            field: Some("plantier".into()),
            limit: crate::why::DEFAULT_LIMIT,
            live: true,
        },
        Some(crate::why::LiveSources {
            connectors: &connectors,
            pendo: &app.pendo,
        }),
    )
    .await
    .map_err(|e| AppError::Runtime(e.to_string()))?;
    for line in crate::why::render_table(&why).lines() {
        println!("   {line}");
    }
    let explained = why
        .verdict
        .as_deref()
        .is_some_and(|v| v.contains("Pendo was edited after pendo-sync confirmed"));

    println!(
        "\n6. `resync sf-accounts` pushes every mapped value whatever the shadow says: the edits are repaired"
    );
    app.sync(Some("sf-accounts"), Mode::Resync, false, &cancel, &())
        .await?;
    println!(
        "   Pendo now holds plantier {} and arr {} for the two accounts",
        sims.pendo
            .value(Kind::Account, &edited[0], "plantier")
            .unwrap_or_default(),
        sims.pendo
            .value(Kind::Account, &edited[1], "arr")
            .unwrap_or_default()
    );
    println!(
        "\n7. Someone renames the HubSpot property `lifecyclestage`: HubSpot now omits it, so every contact's stage reads as empty"
    );
    sims.hubspot.hide_property("contacts", "lifecyclestage");
    let stages_before = held_stages(&sims);
    sims.pendo.reset_requests();
    let renamed = app
        .sync(Some("hs-contacts"), Mode::Reconcile, false, &cancel, &())
        .await?;
    let mut guarded = false;
    if let Some(crate::store::GuardOutcome::Held { hold_id, .. }) = &renamed.cycles[0].guard {
        guarded = true;
        println!("   the reconcile would clear it on every visitor; the guard HELD it instead:\n");
        if let Some(hold) = app.store.hold(*hold_id).await? {
            crate::status::print_hold(&hold);
        }
        app.store
            .decide_hold(
                *hold_id,
                false,
                "demo",
                Some("the property was renamed in HubSpot"),
            )
            .await
            .map_err(|e| AppError::Runtime(e.to_string()))?;
        app.drain(&cancel, std::time::Duration::ZERO).await?;
        println!(
            "\n   rejected (`pendo-sync holds reject {hold_id}`): Pendo requests {}, visitors with a lifecycle stage in Pendo {} before, {} after",
            sims.pendo.requests().len(),
            stages_before,
            held_stages(&sims)
        );
    } else {
        println!("   UNEXPECTED: the guard did not hold the mass clear");
    }
    app.store.close().await;

    println!(
        "\n8. RevOps maps one more field, `accountname` from the account's Name, and just runs the next sync"
    );
    let mut more = (*settings).clone();
    if let Some(m) = more.mappings.iter_mut().find(|m| m.name == "sf-accounts") {
        m.fields.insert(
            "accountname".into(),
            crate::config::FieldSettings {
                from: "Name".into(),
                field_type: crate::domain::FieldType::String,
                transform: None,
                on_null: Default::default(),
            },
        );
    }
    let app = App::open_configured(Arc::new(more)).await?;
    for line in crate::reconfigure::plan(&app.settings, &app.store)
        .await?
        .lines()
    {
        println!("   `pendo-sync check`: {line}");
    }
    sims.pendo.reset_requests();
    app.sync(Some("sf-accounts"), Mode::Incremental, false, &cancel, &())
        .await?;
    let sent: Vec<(String, String, serde_json::Value)> = sims
        .pendo
        .requests()
        .iter()
        .flat_map(|r| r.written_values())
        .collect();
    let names = sent.iter().filter(|(_, f, _)| f == "accountname").count();
    let filled = names == accounts * 9 / 10 && names == sent.len();
    println!(
        "   a full reconcile by itself: {names} `accountname` values sent, {} other values sent again",
        sent.len() - names
    );
    println!(
        "\n{} in {:.1}s. State file: {}",
        if drift == 2 {
            "Done: the audit found exactly the two hand edits"
        } else {
            "Unexpected audit result"
        },
        started.elapsed().as_secs_f64(),
        settings.state.path.display()
    );
    app.store.close().await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(
        if drift == 2 && second.failed.is_empty() && guarded && explained && filled {
            0
        } else {
            1
        },
    )
}

/// Visitors for which Pendo holds a lifecycle stage.
fn held_stages(sims: &Sims) -> usize {
    sims.pendo
        .values(Kind::Visitor)
        .values()
        .filter(|v| v.get("lifecyclestage").is_some_and(|s| !s.is_null()))
        .count()
}

fn report(r: &crate::app::SyncReport, sims: &Sims) {
    for c in &r.cycles {
        println!(
            "   {:<12} pulled {:>5} records, {:>5} field changes, {} set aside",
            c.mapping, c.pulled, c.changes, c.invalid
        );
    }
    for (m, e) in &r.failed {
        println!("   {m:<12} FAILED: {e}");
    }
    if let Some(d) = &r.drain {
        println!(
            "   Pendo: {} requests, {} records confirmed, {} unknown ids",
            d.requests, d.confirmed, d.unmatched
        );
    }
    let accounts = sims
        .pendo
        .values(Kind::Account)
        .values()
        .filter(|v| !v.is_empty())
        .count();
    let visitors = sims
        .pendo
        .values(Kind::Visitor)
        .values()
        .filter(|v| !v.is_empty())
        .count();
    println!("   Pendo now holds metadata for {accounts} accounts and {visitors} visitors");
}
