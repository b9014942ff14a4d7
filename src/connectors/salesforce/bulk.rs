//! Bulk API 2.0 query jobs for large full pulls: create a `queryAll` job, poll it until
//! `JobComplete`, then read CSV result pages by `Sforce-Locator` (the literal `null` ends).
//!
//! CSV cells stay JSON strings (the engine coerces `"1200000"`, `"true"` and ISO dates, as it
//! does for HubSpot); an empty cell is null. Bulk results come in no particular order, so pages
//! carry no watermark except the last, which carries the newest `(SystemModstamp, Id)` seen.

use serde_json::{Map, Value, json};

use crate::connectors::{ConnectorError, Page, PullSpec, RawRecord};

use super::soql::{self, Cursor};
use super::{API, Req, SalesforceConnector};

/// Rows per results page: large pages, few requests.
const MAX_RECORDS: u32 = 50_000;
/// Give up on a job that has not finished after this many polls (about an hour at 10 s).
const MAX_POLLS: u32 = 400;

pub(super) struct BulkState {
    job: String,
    /// `None` before the first page; `Some("null")` after the last.
    locator: Option<String>,
    newest: Option<Cursor>,
}

impl BulkState {
    pub(super) fn finished(&self) -> bool {
        self.locator.as_deref() == Some("null")
    }
}

/// Creates the job and waits for it to complete.
pub(super) async fn start(
    conn: &SalesforceConnector,
    spec: &PullSpec,
    probed: &mut bool,
) -> Result<BulkState, ConnectorError> {
    let mut req = Req::get(conn.data_path("jobs/query"));
    req.method = reqwest::Method::POST;
    req.json = Some(
        json!({"operation": "queryAll", "query": soql::bulk_query(spec), "contentType": "CSV"}),
    );
    let ans = conn.send(&req, Some(&mut *probed)).await?;
    let job = conn.json(ans, &spec.mapping)?;
    let id = job["id"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| ConnectorError::Protocol {
            api: API,
            message: "Bulk job created without an id".into(),
        })?;
    let mut wait = conn.backoff.poll;
    for _ in 0..MAX_POLLS {
        tokio::time::sleep(wait).await;
        wait = (wait * 3 / 2).min(conn.backoff.poll * 10);
        let ans = conn
            .send(
                &Req::get(conn.data_path(&format!("jobs/query/{id}"))),
                Some(&mut *probed),
            )
            .await?;
        let info = conn.json(ans, &spec.mapping)?;
        match info["state"].as_str().unwrap_or("") {
            "JobComplete" => {
                return Ok(BulkState {
                    job: id,
                    locator: None,
                    newest: None,
                });
            }
            state @ ("Failed" | "Aborted") => {
                let why = info["errorMessage"].as_str().unwrap_or("no reason given");
                return Err(ConnectorError::Transient {
                    api: API,
                    message: format!("Bulk job {id} for mapping {} {state}: {why}", spec.mapping),
                });
            }
            _ => {}
        }
    }
    Err(ConnectorError::Transient {
        api: API,
        message: format!(
            "Bulk job {id} for mapping {} did not finish in time",
            spec.mapping
        ),
    })
}

/// Reads the next results page.
pub(super) async fn next_page(
    conn: &SalesforceConnector,
    spec: &PullSpec,
    probed: &mut bool,
    st: &mut BulkState,
) -> Result<Option<Page>, ConnectorError> {
    if st.finished() {
        return Ok(None);
    }
    let mut req = Req::get(conn.data_path(&format!("jobs/query/{}/results", st.job)));
    req.query.push(("maxRecords", MAX_RECORDS.to_string()));
    if let Some(l) = &st.locator {
        req.query.push(("locator", l.clone()));
    }
    let ans = conn.send(&req, Some(probed)).await?;
    if ans.status != 200 {
        return Err(conn
            .json(ans, &spec.mapping)
            .err()
            .unwrap_or(ConnectorError::Protocol {
                api: API,
                message: "Bulk results answered without a body".into(),
            }));
    }
    let locator = ans
        .headers
        .get("sforce-locator")
        .and_then(|v| v.to_str().ok())
        .filter(|l| !l.is_empty())
        .unwrap_or("null")
        .to_owned();
    let rows = parse_csv(&ans.body).map_err(|m| ConnectorError::Protocol {
        api: API,
        message: format!("Bulk CSV: {m}"),
    })?;
    let mut records = Vec::new();
    let mut rows = rows.into_iter();
    if let Some(header) = rows.next() {
        let col = |name: &str| header.iter().position(|h| h.eq_ignore_ascii_case(name));
        let (Some(id_col), Some(ts_col)) = (col("Id"), col("SystemModstamp")) else {
            return Err(ConnectorError::Protocol {
                api: API,
                message: "Bulk CSV without Id/SystemModstamp columns".into(),
            });
        };
        let deleted_col = col("IsDeleted");
        let field_cols: Vec<(String, Option<usize>)> = spec
            .fields
            .iter()
            .map(|f| (f.key(), col(&f.path)))
            .collect();
        for row in rows {
            let cell = |i: usize| row.get(i).map(String::as_str).unwrap_or("");
            let id = cell(id_col).to_owned();
            let ts =
                soql::parse_datetime(cell(ts_col)).ok_or_else(|| ConnectorError::Protocol {
                    api: API,
                    message: format!("Bulk CSV: unreadable SystemModstamp {:?}", cell(ts_col)),
                })?;
            let mut fields = Map::new();
            for (key, c) in &field_cols {
                let v = match c.map(cell) {
                    None | Some("") => Value::Null,
                    Some(s) => Value::String(s.to_owned()),
                };
                fields.insert(key.clone(), v);
            }
            let cur = Cursor { ts, id: id.clone() };
            if st.newest.as_ref().is_none_or(|n| &cur > n) {
                st.newest = Some(cur);
            }
            records.push(RawRecord {
                crm_id: id,
                fields: Value::Object(fields),
                deleted: deleted_col.is_some_and(|c| cell(c).eq_ignore_ascii_case("true")),
                modified_at: Some(ts.timestamp_millis()),
            });
        }
    }
    st.locator = Some(locator);
    let watermark = if st.finished() {
        st.newest.as_ref().map(Cursor::to_watermark)
    } else {
        None
    };
    if records.is_empty() && watermark.is_none() && st.finished() {
        return Ok(None);
    }
    Ok(Some(Page { records, watermark }))
}

/// RFC 4180 CSV: quoted fields, `""` escapes, embedded newlines, LF or CRLF line ends.
pub(super) fn parse_csv(text: &str) -> Result<Vec<Vec<String>>, String> {
    let mut rows = Vec::new();
    let mut row = Vec::new();
    let mut field = String::new();
    let mut chars = text.chars().peekable();
    let mut in_quotes = false;
    let mut at_field_start = true;
    while let Some(c) = chars.next() {
        if in_quotes {
            match c {
                '"' if chars.peek() == Some(&'"') => {
                    chars.next();
                    field.push('"');
                }
                '"' => in_quotes = false,
                c => field.push(c),
            }
            continue;
        }
        match c {
            '"' if at_field_start => {
                in_quotes = true;
                at_field_start = false;
            }
            ',' => {
                row.push(std::mem::take(&mut field));
                at_field_start = true;
            }
            '\r' if chars.peek() == Some(&'\n') => {}
            '\n' => {
                row.push(std::mem::take(&mut field));
                rows.push(std::mem::take(&mut row));
                at_field_start = true;
            }
            c => {
                field.push(c);
                at_field_start = false;
            }
        }
    }
    if in_quotes {
        return Err("unterminated quoted field (truncated body?)".into());
    }
    if !field.is_empty() || !row.is_empty() {
        row.push(field);
        rows.push(row);
    }
    Ok(rows)
}

#[cfg(test)]
mod unit {
    use super::parse_csv;

    #[test]
    fn csv_handles_quotes_escapes_and_newlines() {
        let text = "\"Id\",\"Name\"\r\n\"001\",\"Acme \"\"West\"\"\nline 2\"\n\"002\",\n";
        let rows = parse_csv(text).unwrap();
        assert_eq!(
            rows,
            vec![
                vec!["Id".to_owned(), "Name".to_owned()],
                vec!["001".to_owned(), "Acme \"West\"\nline 2".to_owned()],
                vec!["002".to_owned(), String::new()],
            ]
        );
        assert!(parse_csv("\"a,b").is_err());
    }
}
