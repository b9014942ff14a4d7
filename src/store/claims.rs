//! Claims: per mapping, which CRM record names which Pendo id (with its values digest). See
//! `migrations/0003_trust.sql`. The engine reads them on incremental pulls (a second claimant
//! outside the pull, a deleted record's id still claimed) and writes them with each page.

/// A claim as the engine writes it: (CRM id, Pendo id, values digest).
pub type Claim = (String, String, u64);
