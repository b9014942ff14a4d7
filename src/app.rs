//! Wiring: settings + state file + Pendo client + writer + one connector per CRM source, and the
//! operations the commands share (a sync pass over the mappings, then a drain of the outbox).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::{ConfigError, MappingSettings, Settings, Source};
use crate::connectors::{Connector, PullSpec};
use crate::engine::{self, CycleError, CycleReport, Mode, Progress};
use crate::mapping::Mapping;
use crate::pendo::{DrainReport, PendoClient, Writer, WriterConfig, WriterError};
use crate::store::{Store, StoreError};

/// A failure of a command, sorted by exit code.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// Exit 2: the configuration (or a usage) is wrong; the message names the key.
    #[error("configuration error: {0}")]
    Config(#[from] ConfigError),
    /// Exit 1: something failed at run time.
    #[error("{0}")]
    Runtime(String),
}

impl AppError {
    pub fn exit_code(&self) -> u8 {
        match self {
            AppError::Config(_) => 2,
            AppError::Runtime(_) => 1,
        }
    }
}

impl From<StoreError> for AppError {
    fn from(e: StoreError) -> Self {
        AppError::Runtime(e.to_string())
    }
}

impl From<WriterError> for AppError {
    fn from(e: WriterError) -> Self {
        AppError::Runtime(e.to_string())
    }
}

impl From<CycleError> for AppError {
    fn from(e: CycleError) -> Self {
        AppError::Runtime(e.to_string())
    }
}

/// One connector per source, shared by every mapping of that source (and so is its limiter).
pub type Connectors = HashMap<Source, Arc<dyn Connector>>;

/// The assembled application.
pub struct App {
    pub settings: Arc<Settings>,
    pub store: Store,
    pub pendo: PendoClient,
    pub writer: Writer,
    connectors: Connectors,
}

/// What `sync` did.
#[derive(Debug, Default)]
pub struct SyncReport {
    pub cycles: Vec<CycleReport>,
    pub failed: Vec<(String, String)>,
    pub drain: Option<DrainReport>,
}

impl App {
    /// Opens the state file and builds the Pendo side. `connectors` come from
    /// [`crate::connectors::build`] (or a test's fixtures).
    pub async fn open(settings: Arc<Settings>, connectors: Connectors) -> Result<App, AppError> {
        let key = settings
            .pendo
            .integration_key_source
            .resolve("pendo.integration_key")?;
        let store = Store::open(&settings.state.path).await?;
        let pendo = PendoClient::new(&settings.pendo, key);
        let writer = Writer::new(
            store.clone(),
            pendo.clone(),
            WriterConfig::from_settings(&settings.pendo),
        );
        Ok(App {
            settings,
            store,
            pendo,
            writer,
            connectors,
        })
    }

    /// The configured mappings, or the one named.
    pub fn mappings(&self, only: Option<&str>) -> Result<Vec<&MappingSettings>, AppError> {
        match only {
            Some(name) => Ok(vec![self.settings.mapping(name)?]),
            None => Ok(self.settings.mappings.iter().collect()),
        }
    }

    pub fn connector(&self, source: Source) -> Result<&dyn Connector, AppError> {
        self.connectors
            .get(&source)
            .map(|c| c.as_ref())
            .ok_or_else(|| {
                AppError::Config(ConfigError::new(
                    source.as_str(),
                    "no connector configured for this source",
                ))
            })
    }

    /// Runs one cycle of `mode` for one mapping.
    pub async fn cycle(
        &self,
        m: &MappingSettings,
        mode: Mode,
        dry_run: bool,
        progress: &dyn Progress,
    ) -> Result<CycleReport, CycleError> {
        let connector = self
            .connectors
            .get(&m.source)
            .expect("validated config has a connector per used source");
        let overlap = self.settings.schedule.overlap;
        let mapping = Mapping::new(m);
        engine::run_cycle(
            &self.store,
            connector.as_ref(),
            &mapping,
            |since| PullSpec::for_mapping(m, since, overlap),
            mode,
            dry_run,
            progress,
        )
        .await
    }

    /// One pass: a cycle per mapping (a failing mapping does not stop the others), then the
    /// outbox drained. Dry runs write nothing and send nothing.
    pub async fn sync(
        &self,
        only: Option<&str>,
        mode: Mode,
        dry_run: bool,
        cancel: &CancellationToken,
        progress: &dyn Progress,
    ) -> Result<SyncReport, AppError> {
        let mut report = SyncReport::default();
        for m in self.mappings(only)? {
            if cancel.is_cancelled() {
                break;
            }
            match self.cycle(m, mode, dry_run, progress).await {
                Ok(r) => report.cycles.push(r),
                Err(CycleError::Store(e)) => return Err(e.into()),
                Err(e) => {
                    tracing::error!(mapping = %m.name, error = %e, "Cycle failed; its watermark stays where the last committed page left it.");
                    report.failed.push((m.name.clone(), e.to_string()));
                }
            }
        }
        if !dry_run && !cancel.is_cancelled() {
            report.drain = Some(self.drain(cancel, engine::SYNC_RETRY_WAIT).await?);
        }
        Ok(report)
    }

    /// Starts the writer (releasing stale leases) and drains the outbox.
    pub async fn drain(
        &self,
        cancel: &CancellationToken,
        wait_for_retries: Duration,
    ) -> Result<DrainReport, AppError> {
        self.writer.start().await?;
        Ok(self.writer.drain(cancel, wait_for_retries).await?)
    }
}
