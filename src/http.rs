//! Reading HTTP answers with a bound: a misbehaving server (or a proxy's endless error page) must
//! not make the process hold an unbounded body in memory. Every client (Pendo, Salesforce,
//! HubSpot) reads its bodies through [`body_text`].

/// The largest body any client reads: far above a Salesforce Bulk 2.0 result page (50,000
/// records) or a HubSpot page, far below what would threaten the process.
pub const MAX_BODY_BYTES: usize = 256 << 20;

#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error(
        "the response body is larger than {} MiB (stopped reading at {} bytes); the server or a proxy in between is misbehaving",
        cap >> 20,
        read
    )]
    TooLarge { cap: usize, read: usize },
    #[error("reading the response body failed: {0}")]
    Read(String),
}

impl BodyError {
    /// A body cut short can be read again; one that is too large will be too large again.
    pub fn is_too_large(&self) -> bool {
        matches!(self, BodyError::TooLarge { .. })
    }
}

/// The body as text (lossy UTF-8), refused past `cap` bytes (a declared Content-Length over the
/// cap is refused before reading).
pub async fn body_text(mut response: reqwest::Response, cap: usize) -> Result<String, BodyError> {
    if let Some(len) = response.content_length()
        && len as usize > cap
    {
        return Err(BodyError::TooLarge {
            cap,
            read: len as usize,
        });
    }
    let mut bytes: Vec<u8> = Vec::new();
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                if bytes.len() + chunk.len() > cap {
                    return Err(BodyError::TooLarge {
                        cap,
                        read: bytes.len() + chunk.len(),
                    });
                }
                bytes.extend_from_slice(&chunk);
            }
            Ok(None) => break,
            Err(e) => return Err(BodyError::Read(e.without_url().to_string())),
        }
    }
    Ok(match String::from_utf8(bytes) {
        Ok(text) => text,
        Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
    })
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A one-shot server answering `body`, with a Content-Length or chunked (no length known).
    async fn serve(body: &'static str, chunked: bool) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let mut buf = [0u8; 1024];
                let _ = socket.read(&mut buf).await;
                let answer = if chunked {
                    let mut text =
                        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                            .to_owned();
                    for part in body.as_bytes().chunks(10) {
                        text.push_str(&format!(
                            "{:x}\r\n{}\r\n",
                            part.len(),
                            String::from_utf8_lossy(part)
                        ));
                    }
                    text.push_str("0\r\n\r\n");
                    text
                } else {
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    )
                };
                let _ = socket.write_all(answer.as_bytes()).await;
            }
        });
        format!("http://{addr}/")
    }

    #[tokio::test]
    async fn a_body_over_the_cap_is_refused_with_a_clear_error() {
        for chunked in [false, true] {
            let url = serve("0123456789abcdefghij0123456789", chunked).await;
            let ok = body_text(reqwest::get(&url).await.unwrap(), 30)
                .await
                .unwrap();
            assert_eq!(ok.len(), 30);
            let err = body_text(reqwest::get(&url).await.unwrap(), 25)
                .await
                .unwrap_err();
            assert!(err.is_too_large(), "{err}");
            assert!(err.to_string().contains("larger than"), "{err}");
        }
    }
}
