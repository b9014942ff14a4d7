//! Loopback simulators of the three remote APIs (Pendo, Salesforce, HubSpot), written from the
//! facts in `../shared/reference/`: real paths, bodies, paging, auth checks, error shapes and rate
//! limits, plus fault knobs for tests. `demo`, `simulate`, the integration tests and the
//! benchmarks use them; nothing here is used by a real sync.
//!
//! Each simulator keeps its state behind a cheap, cloneable handle so a test can change the
//! CRM or read back what Pendo holds, in-process or over HTTP (`/_sim/...` routes).

pub mod config;
pub mod hubspot;
pub mod pendo;
pub mod postgres;
pub mod salesforce;

use std::net::SocketAddr;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The `[mappings.fields]` table of a mapping of the Salesforce simulator's `Account` records
/// (the fields it seeds), as text: [`config::SF_ACCOUNT`] rendered (a unit test keeps the two
/// equal). Configs are built with [`config::SimConfig`]; this is for hand-written ones.
pub const SF_ACCOUNT_FIELDS: &str = r#"  [mappings.fields]
  plantier    = { from = "Plan_Tier__c",    type = "string" }
  arr         = { from = "ARR__c",          type = "number" }
  owneremail  = { from = "Owner.Email",     type = "string" }
  renewaldate = { from = "Renewal_Date__c", type = "date" }
  isstrategic = { from = "Strategic__c",    type = "boolean" }
"#;

/// The `[mappings.fields]` table of a mapping of the HubSpot simulator's contacts, as text:
/// [`config::HS_CONTACT`] rendered.
pub const HS_CONTACT_FIELDS: &str = r#"  [mappings.fields]
  lifecyclestage = { from = "lifecyclestage",   type = "string" }
  owneremail     = { from = "hubspot_owner_id", type = "string", transform = "owner_email" }
  csmname        = { from = "hubspot_owner_id", type = "string", transform = "owner_name" }
"#;

/// A simulator serving on loopback until [`SimServer::shutdown`] or drop.
#[derive(Debug)]
pub struct SimServer {
    pub addr: SocketAddr,
    token: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl SimServer {
    /// Serves `router` on `addr` (`127.0.0.1:0` picks a free port).
    pub async fn start(router: axum::Router, addr: SocketAddr) -> std::io::Result<SimServer> {
        let listener = TcpListener::bind(addr).await?;
        Ok(Self::from_listener(router, listener))
    }

    pub fn from_listener(router: axum::Router, listener: TcpListener) -> SimServer {
        let addr = listener
            .local_addr()
            .expect("bound listener has an address");
        let token = CancellationToken::new();
        let stop = token.clone();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await;
        });
        SimServer {
            addr,
            token,
            task: Some(task),
        }
    }

    /// `http://127.0.0.1:PORT`, no trailing slash.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn shutdown(mut self) {
        self.token.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for SimServer {
    fn drop(&mut self) {
        self.token.cancel();
    }
}
