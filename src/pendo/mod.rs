//! The Pendo side: the API client ([`client`]) and the outbox writer ([`writer`]).

pub mod adopt;
pub mod client;
pub mod discovery;
pub mod values;
pub mod writer;

pub use client::{BulkResult, PendoClient, PendoError, TokenInfo};
pub use writer::{DrainReport, FailPoint, Step, Writer, WriterConfig, WriterError};
